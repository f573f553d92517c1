use std::path::{Path, PathBuf};
use std::time::Duration;

use consilium_backend::configuration::Settings;
use consilium_backend::context::AppContext;
use consilium_backend::demo::{self, Cast};
use consilium_backend::startup::Application;
use fantoccini::{Client, ClientBuilder, Locator};

pub const PASSWORD: &str = demo::DEMO_PASSWORD;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn find_program(env: &str, names: &[&str]) -> PathBuf {
    if let Ok(p) = std::env::var(env) {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for n in names {
            let p = dir.join(n);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "{} not found (or set {env}); install Debian's chromium and chromium-driver \
         (apt-get install -y chromium chromium-driver) — scripts/test does it",
        names.join(" or ")
    );
}

/// Awaits a WebDriver call, or fails the test when the browser does not answer within 90 s
/// (a hung page would otherwise hang the test run; two browsers and two servers share two
/// cores in CI, so a slow answer is not yet a hung one).
async fn within<T>(what: &str, call: impl std::future::Future<Output = T>) -> T {
    within_secs(90, what, call).await
}

async fn within_secs<T>(secs: u64, what: &str, call: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), call)
        .await
        .unwrap_or_else(|_| panic!("the browser did not answer within {secs} s: {what}"))
}

/// How long the browser tries to load a page before it gives up (and `Portal::goto` tells a
/// slow browser from a portal that does not answer): under the `within` limit, so that the
/// browser answers first.
const PAGE_LOAD: Duration = Duration::from_secs(45);

async fn set_page_load(browser: &Client) {
    browser
        .update_timeouts(fantoccini::wd::TimeoutConfiguration::new(
            None,
            Some(PAGE_LOAD),
            None,
        ))
        .await
        .unwrap_or_else(|e| panic!("set the browser's page-load limit: {e}"));
}

/// A running server with the demo's cast (people, committee, three sites), site workers for
/// the first `workers` sites, and a headless Chromium to look at it.
pub struct Portal {
    pub url: String,
    pub ctx: AppContext,
    pub cast: Cast,
    pub browser: Client,
    shots: PathBuf,
    step: usize,
    _driver: tokio::process::Child,
    _dir: tempfile::TempDir,
}

impl Portal {
    pub async fn start(test: &str, workers: usize) -> Portal {
        Self::start_with(test, workers, |_| {}).await
    }

    /// As `start`, with the settings changed by `configure` before the server starts.
    pub async fn start_with(
        test: &str,
        workers: usize,
        configure: impl FnOnce(&mut Settings),
    ) -> Portal {
        Self::start_full(test, workers, configure, false).await
    }

    /// As `start`, the sites' workers holding segmentation data (a lesion mask beside each
    /// phantom). A U-Net's round takes seconds alone and can take minutes beside the other
    /// browser tests on two cores: its round waits up to 10 minutes, not 2.
    pub async fn start_segmenting(test: &str, workers: usize) -> Portal {
        Self::start_full(
            test,
            workers,
            |s| s.engine.round_timeout_seconds = 600,
            true,
        )
        .await
    }

    async fn start_full(
        test: &str,
        workers: usize,
        configure: impl FnOnce(&mut Settings),
        masks: bool,
    ) -> Portal {
        let site_root = workspace().join("target").join("site");
        let bundle = site_root.join("pkg").join("consilium_bg.wasm");
        assert!(
            bundle.is_file(),
            "the portal's browser bundle {} is missing: run scripts/build-portal first",
            bundle.display()
        );
        let chromium = find_program("CHROMIUM", &["chromium", "chromium-browser"]);
        let chromedriver = find_program("CHROMEDRIVER", &["chromedriver"]);

        let dir = tempfile::tempdir().expect("temp dir");
        let mut settings = Settings::default();
        settings.server.port = 0;
        settings.database.data_dir = dir.path().join("data");
        settings.log.level = "warn".into();
        settings.engine.round_timeout_seconds = 120;
        settings.portal.site_root = site_root;
        configure(&mut settings);
        let app = Application::build(settings)
            .await
            .expect("the server starts");
        let url = format!("http://127.0.0.1:{}", app.port());
        let ctx = app.context.clone();
        let broker = app.broker.clone();
        tokio::spawn(app.run_until_stopped());

        let mut scenario = demo::demo_scenario().expect("the demo's scenario");
        if !ctx.settings.auth.local_accounts_enabled() {
            scenario.password = None;
        }
        let cast = demo::cast(&ctx, &scenario).await.expect("the cast");
        let sites: Vec<(uuid::Uuid, String)> = cast
            .sites
            .iter()
            .take(workers)
            .map(|(s, _, _)| (s.id, s.name.clone()))
            .collect();
        if !sites.is_empty() {
            let specs = demo::synthetic_sites(dir.path(), &sites, false, masks).expect("site data");
            // The server binary decodes the sites' files, as in the demo (this test program
            // is not a decoder).
            let decoder =
                consilium_worker::decode::Decoder::program(env!("CARGO_BIN_EXE_consilium"));
            demo::start_workers(&ctx, &broker, &url, specs, decoder, &|_, a| a)
                .await
                .expect("the site workers start");
        }

        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
            l.local_addr().expect("port").port()
        };
        let driver = tokio::process::Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromedriver.display()));
        let driver_url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let mut ready = false;
        for _ in 0..100 {
            if let Ok(r) = http.get(format!("{driver_url}/status")).send().await
                && r.status().is_success()
            {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ready, "chromedriver did not answer on {driver_url}");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": chromium.display().to_string(),
                "args": ["--headless", "--no-sandbox", "--disable-background-networking",
                         "--disable-dev-shm-usage", "--window-size=1280,1000"],
            }),
        );
        let session = || async {
            ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                .capabilities(caps.clone())
                .connect(&driver_url)
                .await
                .expect("a Chromium session")
        };
        // A new browser's first page (its profile, caches and the portal's bundle) takes
        // longest; it is opened once here, before any step is timed. On a loaded machine a
        // new session's first navigation has been seen never to return; such a session is
        // left and one more is opened (once): a hang of the portal itself fails both.
        let first = format!("{url}/signin");
        let mut browser = session().await;
        match tokio::time::timeout(Duration::from_secs(90), browser.goto(&first)).await {
            Ok(opened) => opened.unwrap_or_else(|e| panic!("open the portal: {e}")),
            Err(_) => {
                eprintln!("{test}: the browser's first page did not load in 90 s; a new session");
                browser = session().await;
                within_secs(180, "the portal's first page", browser.goto(&first))
                    .await
                    .unwrap_or_else(|e| panic!("open the portal: {e}"));
            }
        }

        set_page_load(&browser).await;

        let shots = workspace()
            .join("target")
            .join("portal-screenshots")
            .join(test);
        let _ = std::fs::remove_dir_all(&shots);
        std::fs::create_dir_all(&shots).expect("screenshot folder");
        Portal {
            url,
            ctx,
            cast,
            browser,
            shots,
            step: 0,
            _driver: driver,
            _dir: dir,
        }
    }

    /// Opens `path`. A page load the browser gives up on (`PAGE_LOAD`) is told apart from a
    /// portal that does not answer: the server is asked for the same page directly, with the
    /// browser's cookies, and the page is loaded once more; a second failure fails the test
    /// with what the server answered.
    pub async fn goto(&self, path: &str) {
        let url = format!("{}{path}", self.url);
        match within(path, self.browser.goto(&url)).await {
            Ok(()) => {}
            Err(e) if e.is_timeout() => {
                let direct = self.fetch_directly(&url).await;
                eprintln!(
                    "{path}: the browser did not finish loading it ({e}); {direct}; loading it again"
                );
                within(path, self.browser.goto(&url))
                    .await
                    .unwrap_or_else(|e| panic!("open {path} (twice): {e}; {direct}"));
            }
            Err(e) => panic!("open {path}: {e}"),
        }
    }

    /// What the server answers for `url` to this browser's cookies, asked without the browser.
    async fn fetch_directly(&self, url: &str) -> String {
        let cookies = match within("cookies", self.browser.get_all_cookies()).await {
            Ok(c) => c
                .iter()
                .map(|c| format!("{}={}", c.name(), c.value()))
                .collect::<Vec<_>>()
                .join("; "),
            Err(e) => return format!("the browser did not give its cookies: {e}"),
        };
        let started = std::time::Instant::now();
        let answer = reqwest::Client::new()
            .get(url)
            .header("cookie", cookies)
            .timeout(Duration::from_secs(60))
            .send()
            .await;
        let secs = started.elapsed().as_secs_f64();
        match answer {
            Ok(r) => match r.text().await {
                Ok(body) => format!(
                    "the server answered it directly in {secs:.1} s ({} bytes)",
                    body.len()
                ),
                Err(e) => format!("the server's answer broke off after {secs:.1} s: {e}"),
            },
            Err(e) => format!("the server did not answer it directly in {secs:.1} s: {e}"),
        }
    }

    pub async fn path(&self) -> String {
        self.browser
            .current_url()
            .await
            .expect("url")
            .path()
            .to_string()
    }

    /// Everything the page shows, as text.
    pub async fn text(&self) -> String {
        self.text_of("body").await
    }

    /// The text of the element `css` (asked again while the page is being replaced).
    pub async fn text_of(&self, css: &str) -> String {
        let mut last = String::new();
        for _ in 0..40 {
            match within(css, self.browser.find(Locator::Css(css))).await {
                Ok(el) => match within(css, el.text()).await {
                    Ok(t) => return t,
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("{css}: {last}");
    }

    /// Waits until the page shows `needle` (up to `secs` seconds), without reloading it.
    pub async fn wait_for(&self, needle: &str, secs: u64) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let t = self.text().await;
            if t.contains(needle) {
                return t;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("the page never showed {needle:?}; it shows:\n{t}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits until the browser bundle has hydrated the page (its scripts ran).
    pub async fn hydrated(&self) {
        for _ in 0..80 {
            let v = within(
                "hydration",
                self.browser.execute(
                    "return document.body.getAttribute('data-hydrated');",
                    vec![],
                ),
            )
            .await
            .expect("script");
            if v == serde_json::json!("true") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("the page never hydrated (is the browser bundle current? scripts/build-portal)");
    }

    /// The element `css`, waiting up to 10 s for it to appear: a page's heading can show
    /// before its form (the page's data and the bundle's hydration arrive after it).
    async fn element(&self, css: &str) -> fantoccini::elements::Element {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match within(css, self.browser.find(Locator::Css(css))).await {
                Ok(el) => return el,
                Err(e) if tokio::time::Instant::now() > deadline => panic!("{css}: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }

    pub async fn fill(&self, css: &str, value: &str) {
        let el = self.element(css).await;
        within(css, el.clear()).await.expect("clear");
        within(css, el.send_keys(value)).await.expect("type");
    }

    pub async fn click(&self, css: &str) {
        within(css, self.element(css).await.click())
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// Clicks the button that reads `label`, or else the link; waits up to 10 s for one to
    /// appear (a page's lists may load after its heading).
    pub async fn press(&self, label: &str) {
        let button = format!("//button[normalize-space(.)=\"{label}\"]");
        let link = format!("//a[normalize-space(.)=\"{label}\"]");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let el = loop {
            if let Ok(el) = self.browser.find(Locator::XPath(&button)).await {
                break el;
            }
            match self.browser.find(Locator::XPath(&link)).await {
                Ok(el) => break el,
                Err(e) if tokio::time::Instant::now() > deadline => {
                    panic!("no button or link {label:?}: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        };
        within(label, el.click())
            .await
            .unwrap_or_else(|e| panic!("press {label:?}: {e}"));
    }

    /// Picks the option that reads `label` in the select `css`.
    pub async fn choose(&self, css: &str, label: &str) {
        within(css, self.element(css).await.select_by_label(label))
            .await
            .unwrap_or_else(|e| panic!("choose {label:?} in {css}: {e}"));
    }

    /// Saves what the browser shows as the next numbered screenshot.
    pub async fn shot(&mut self, name: &str) {
        self.step += 1;
        let png = self.browser.screenshot().await.expect("screenshot");
        let path = self.shots.join(format!("{:02}-{name}.png", self.step));
        std::fs::write(&path, png).expect("write screenshot");
    }

    /// Scrolls `css` into the middle of the window, then saves the screenshot.
    pub async fn shot_at(&mut self, name: &str, css: &str) {
        self.browser
            .execute(
                "document.querySelector(arguments[0]).scrollIntoView({block: 'center'});",
                vec![serde_json::json!(css)],
            )
            .await
            .unwrap_or_else(|e| panic!("scroll to {css}: {e}"));
        self.shot(name).await;
    }

    /// Whether the page is no wider than the window (no horizontal page scroll); when it is
    /// wider, the widest elements, to say what overflows.
    pub async fn overflow(&self) -> Option<String> {
        let v = self
            .browser
            .execute(
                r#"const w = window.innerWidth;
                   if (document.documentElement.scrollWidth <= w) return null;
                   const wide = e => e.getBoundingClientRect().right > w + 1;
                   const name = e => e.tagName + (e.id ? '#' + e.id : '') + '.' + (e.getAttribute('class') || '')
                     + ' ' + Math.round(e.getBoundingClientRect().width) + ' px';
                   return [...document.querySelectorAll('body *')]
                     .filter(e => wide(e) && !wide(e.parentElement) && !e.closest('.scroll, .plot, pre, table'))
                     .slice(0, 5)
                     .map(e => name(e) + ' in ' + name(e.parentElement))
                     .join('; ') + ' (page ' + document.documentElement.scrollWidth + ' px)';"#,
                vec![],
            )
            .await
            .expect("measure the page");
        v.as_str().map(str::to_string)
    }

    /// Opens the study page's plan form (it is folded once the study has a plan), after the
    /// page has hydrated.
    pub async fn open_plan_form(&self) {
        self.hydrated().await;
        self.browser
            .execute(
                "document.querySelector('#manifest').closest('details').open = true;",
                vec![],
            )
            .await
            .expect("open the plan form");
    }

    /// The document's title.
    pub async fn title(&self) -> String {
        self.browser.title().await.expect("title")
    }

    pub async fn sign_in(&self, email: &str) {
        self.goto("/signin").await;
        self.fill("#email", email).await;
        self.fill("#password", PASSWORD).await;
        self.press("Sign in").await;
        self.wait_for("Sign out", 20).await;
    }

    pub async fn sign_out(&self) {
        self.press("Sign out").await;
        self.wait_for("Sign in", 20).await;
    }

    pub async fn close(self) {
        self.browser.close().await.expect("close the browser");
    }
}
