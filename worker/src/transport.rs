//! What a worker will talk over. Model updates, tokens and grants cross hospital networks: a
//! worker refuses `http://` and `amqp://` to anything but this machine unless its configuration
//! says `allow_plain_transport = true` (a development or closed-network set-up, such as
//! docker-compose's own network).

use url::{Host, Url};

/// Checks one endpoint (`what` names it in the error).
pub fn check(what: &str, address: &str, allow_plain: bool) -> Result<(), String> {
    let url = Url::parse(address).map_err(|e| format!("{what} is not a URL: {e}"))?;
    let plain = match url.scheme() {
        "https" | "amqps" => false,
        "http" | "amqp" => true,
        other => {
            return Err(format!(
                "{what} uses {other}://: give https:// (server_url) or amqps:// (broker_url)"
            ));
        }
    };
    let loopback = match url.host() {
        // `amqp` is not a scheme the URL standard knows, so its addresses stay text.
        Some(Host::Domain(d)) => {
            d.eq_ignore_ascii_case("localhost")
                || d.trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        Some(Host::Ipv4(ip)) => ip.is_loopback(),
        Some(Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    if plain && !loopback && !allow_plain {
        let secure = if url.scheme() == "http" {
            "https"
        } else {
            "amqps"
        };
        return Err(format!(
            "{what} is {}://{}: updates and credentials would cross the network unencrypted; use {secure}://, or set allow_plain_transport = true for a closed development network",
            url.scheme(),
            url.host_str().unwrap_or("")
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn plain_transport_only_to_this_machine_unless_allowed() {
        for ok in [
            "https://consilium.example.org",
            "amqps://site:pw@broker.example.org:5671/%2f",
            "http://127.0.0.1:8080",
            "amqp://guest:guest@localhost:5672/%2f",
            "amqp://guest:guest@127.0.0.1:5672/consilium-test",
            "amqp://guest:guest@[::1]:5672/%2f",
            "http://[::1]:8080",
        ] {
            assert_eq!(check("server_url", ok, false), Ok(()), "{ok}");
        }
        let err = check("broker_url", "amqp://u:p@rabbitmq:5672/%2f", false).unwrap_err();
        assert!(
            err.contains("amqp://rabbitmq") && err.contains("use amqps://"),
            "{err}"
        );
        assert!(!err.contains("u:p"), "no credentials in the message: {err}");
        assert!(check("broker_url", "amqp://u:p@10.1.2.3:5672/%2f", false).is_err());
        let err = check("server_url", "http://10.0.0.5:8080", false).unwrap_err();
        assert!(err.contains("use https://"), "{err}");
        assert_eq!(check("server_url", "http://server:8080", true), Ok(()));
        assert!(check("server_url", "ftp://x", true).is_err());
    }
}
