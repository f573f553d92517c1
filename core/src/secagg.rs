//! Secure aggregation, SecAgg+ (Bonawitz et al. 2017; Bell et al. 2020): the server learns only
//! the sum of the sites' quantised updates. Every function here is one side of one stage, pure
//! but for the generator it is given (the operating system's at a site):
//!
//! 1. `SiteSecrets::generate`: each site makes two X25519 key pairs for the round, one to agree
//!    masks with its neighbours, one to encrypt what it sends them; the server relays the
//!    public halves (`PublicKeys`).
//! 2. `share_keys`: each site draws its self-mask seed and splits it, and the secret half of its
//!    mask key, with Shamir's scheme (threshold t) among its neighbours, each share encrypted to
//!    its neighbour with ChaCha20-Poly1305 under a key agreed with X25519 and HKDF-SHA-256;
//!    the server relays the ciphertexts; `open_share` reads one at the neighbour.
//! 3. `mask`: each site adds to its quantised update (`quantise`) the ChaCha20 stream of its
//!    self-mask seed and, per neighbour, ± the stream of their agreed 32-byte pairwise seed;
//!    the pairwise masks cancel in the sum of both, the self masks do not.
//! 4. `reveal`: told which neighbours sent a masked input and which dropped out, each site
//!    reveals its share of a survivor's self-mask seed or of a dropped site's mask key, never
//!    both for one site.
//! 5. `unmask` (the server): from t shares it rebuilds the survivors' self masks and the
//!    dropped sites' mask keys, removes those masks from the sum of the masked inputs and gets
//!    the sum of the survivors' updates (`dequantise`), or says whose masks cannot be removed.
//!
//! Threat model: an honest-but-curious server and up to t − 1 colluding sites learn nothing of
//! one site's update beyond the sum. Every derived key is bound to the round (`Context`), so no
//! mask repeats across rounds.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hkdf::Hkdf;
use rand::{CryptoRng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::collections::{BTreeMap, BTreeSet};
use uuid::Uuid;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

/// A site's position in the round's list of participants.
pub type SiteIndex = u32;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SecAggError {
    #[error("secure aggregation: {0}")]
    Invalid(String),
    #[error(
        "secure aggregation: the {what} of site {site} cannot be rebuilt: {got} of the sites holding its shares answered, the threshold is {threshold}"
    )]
    BelowThreshold {
        site: SiteIndex,
        what: &'static str,
        got: usize,
        threshold: usize,
    },
}

fn invalid(reason: impl Into<String>) -> SecAggError {
    SecAggError::Invalid(reason.into())
}

/// What every derived key is bound to: the run and round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Context {
    pub run: Uuid,
    pub round: u32,
}

impl Context {
    fn bytes(&self) -> Vec<u8> {
        let mut b = self.run.as_bytes().to_vec();
        b.extend_from_slice(&self.round.to_le_bytes());
        b
    }

    /// A 32-byte key for `purpose` between sites `a` and `b` (the same both ways) from their
    /// X25519 agreement.
    fn derive(
        &self,
        shared: &[u8; 32],
        purpose: &str,
        a: SiteIndex,
        b: SiteIndex,
    ) -> Result<Zeroizing<[u8; 32]>, SecAggError> {
        let (lo, hi) = (a.min(b), a.max(b));
        let mut info = format!("consilium secagg+ {purpose}").into_bytes();
        info.extend_from_slice(&lo.to_le_bytes());
        info.extend_from_slice(&hi.to_le_bytes());
        let mut out = Zeroizing::new([0u8; 32]);
        Hkdf::<Sha256>::new(Some(&self.bytes()), shared)
            .expand(&info, out.as_mut())
            .map_err(|_| invalid("HKDF-SHA-256 refused to derive a key"))?;
        Ok(out)
    }
}

/// A site's two key pairs for one round.
pub struct SiteSecrets {
    encryption: StaticSecret,
    masking: StaticSecret,
}

/// Their public halves, relayed by the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicKeys {
    #[serde(with = "hex32")]
    pub encryption: [u8; 32],
    #[serde(with = "hex32")]
    pub masking: [u8; 32],
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(b: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(b))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let v = hex::decode(&s).map_err(serde::de::Error::custom)?;
        v.try_into()
            .map_err(|_| serde::de::Error::custom("a key is 32 bytes (64 hex digits)"))
    }
}

impl SiteSecrets {
    pub fn generate(rng: &mut (impl RngCore + CryptoRng)) -> Self {
        SiteSecrets {
            encryption: StaticSecret::random_from_rng(&mut *rng),
            masking: StaticSecret::random_from_rng(&mut *rng),
        }
    }

    pub fn public(&self) -> PublicKeys {
        PublicKeys {
            encryption: PublicKey::from(&self.encryption).to_bytes(),
            masking: PublicKey::from(&self.masking).to_bytes(),
        }
    }
}

/// One share, encrypted from one site to one neighbour.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptedShare {
    pub from: SiteIndex,
    pub to: SiteIndex,
    pub nonce: [u8; 12],
    pub ciphertext: Vec<u8>,
}

/// What a site keeps after sharing: its self-mask seed (for `mask`) and its own share of its
/// secrets (it reveals its seed share itself when it survives; a site that dropped out cannot
/// reveal, so its mask key needs t of its neighbours).
pub struct SelfSeed(Zeroizing<[u8; 32]>, HeldShare);

impl SelfSeed {
    /// This site's own share, to hold beside its neighbours'.
    pub fn own_share(&self) -> HeldShare {
        self.1.clone()
    }
}

/// A neighbour's shares as this site holds them.
#[derive(Clone, Debug)]
pub struct HeldShare {
    pub from: SiteIndex,
    mask_key: Zeroizing<Vec<u8>>,
    seed: Zeroizing<Vec<u8>>,
}

fn aad(ctx: &Context, from: SiteIndex, to: SiteIndex) -> Vec<u8> {
    let mut a = ctx.bytes();
    a.extend_from_slice(&from.to_le_bytes());
    a.extend_from_slice(&to.to_le_bytes());
    a
}

fn agree(secret: &StaticSecret, public: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    Zeroizing::new(secret.diffie_hellman(&PublicKey::from(*public)).to_bytes())
}

/// Stage 2 at site `me`: draws its self-mask seed, splits it and its mask key among its
/// `neighbours` with threshold `threshold`, and encrypts each neighbour's shares to it.
pub fn share_keys(
    ctx: &Context,
    me: SiteIndex,
    secrets: &SiteSecrets,
    neighbours: &[(SiteIndex, PublicKeys)],
    threshold: usize,
    rng: &mut (impl RngCore + CryptoRng),
) -> Result<(SelfSeed, Vec<EncryptedShare>), SecAggError> {
    // One share for each neighbour and one the site keeps.
    let n = neighbours.len();
    if threshold < 2 || threshold > n + 1 || n > 254 {
        return Err(invalid(format!(
            "a threshold of {threshold} among {n} neighbours and the site: it must be 2 to {}, with at most 254 neighbours",
            n + 1
        )));
    }
    let mut seed = Zeroizing::new([0u8; 32]);
    rng.fill_bytes(seed.as_mut());
    let split = |secret: &[u8], rng: &mut dyn RngCore| {
        vsss_rs::Gf256::split_array(threshold, n + 1, secret, Wrap(rng))
            .map_err(|e| invalid(format!("splitting a secret: {e:?}")))
    };
    let key_bytes = Zeroizing::new(secrets.masking.to_bytes());
    let key_shares = Zeroizing::new(split(key_bytes.as_ref(), rng)?);
    let seed_shares = Zeroizing::new(split(seed.as_ref(), rng)?);
    let mut out = Vec::with_capacity(n);
    for (k, (to, keys)) in neighbours.iter().enumerate() {
        if *to == me {
            return Err(invalid("a site is not its own neighbour"));
        }
        let mut plain = Zeroizing::new(Vec::with_capacity(2 + 66));
        plain.push(key_shares[k].len() as u8);
        plain.extend_from_slice(&key_shares[k]);
        plain.extend_from_slice(&seed_shares[k]);
        let key = ctx.derive(
            &agree(&secrets.encryption, &keys.encryption),
            "share key",
            me,
            *to,
        )?;
        let mut nonce = [0u8; 12];
        rng.fill_bytes(&mut nonce);
        let ciphertext = ChaCha20Poly1305::new(&Key::from(*key))
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &plain,
                    aad: &aad(ctx, me, *to),
                },
            )
            .map_err(|_| invalid("encrypting a share failed"))?;
        out.push(EncryptedShare {
            from: me,
            to: *to,
            nonce,
            ciphertext,
        });
    }
    let own = HeldShare {
        from: me,
        mask_key: Zeroizing::new(key_shares[n].clone()),
        seed: Zeroizing::new(seed_shares[n].clone()),
    };
    Ok((SelfSeed(seed, own), out))
}

/// vsss-rs takes its generator by value.
struct Wrap<'a>(&'a mut dyn RngCore);
impl RngCore for Wrap<'_> {
    fn next_u32(&mut self) -> u32 {
        self.0.next_u32()
    }
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.0.fill_bytes(dest)
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        self.0.try_fill_bytes(dest)
    }
}
// Only ever wraps the caller's cryptographic generator (`share_keys` requires one).
impl CryptoRng for Wrap<'_> {}

/// Stage 2 at the neighbour `me`: decrypts and checks a share sent to it.
pub fn open_share(
    ctx: &Context,
    me: SiteIndex,
    secrets: &SiteSecrets,
    sender: &PublicKeys,
    share: &EncryptedShare,
) -> Result<HeldShare, SecAggError> {
    if share.to != me {
        return Err(invalid(format!(
            "a share for site {} was delivered to site {me}",
            share.to
        )));
    }
    let key = ctx.derive(
        &agree(&secrets.encryption, &sender.encryption),
        "share key",
        share.from,
        me,
    )?;
    let plain = Zeroizing::new(
        ChaCha20Poly1305::new(&Key::from(*key))
            .decrypt(
                &Nonce::from(share.nonce),
                Payload {
                    msg: &share.ciphertext,
                    aad: &aad(ctx, share.from, me),
                },
            )
            .map_err(|_| {
                invalid(format!(
                    "the share from site {} does not decrypt: altered, or not from it",
                    share.from
                ))
            })?,
    );
    let split = plain.first().map(|&l| 1 + usize::from(l));
    match split {
        Some(at) if at < plain.len() => Ok(HeldShare {
            from: share.from,
            mask_key: Zeroizing::new(plain[1..at].to_vec()),
            seed: Zeroizing::new(plain[at..].to_vec()),
        }),
        _ => Err(invalid(format!(
            "the share from site {} is malformed",
            share.from
        ))),
    }
}

/// The ChaCha20 stream of `seed`, added (`sign` 1) or taken (`sign` -1) from `out`.
fn apply_stream(seed: &[u8; 32], sign: i8, out: &mut [u32]) {
    let mut rng = ChaCha20Rng::from_seed(*seed);
    let mut block = [0u8; 4096];
    for chunk in out.chunks_mut(block.len() / 4) {
        let bytes = &mut block[..chunk.len() * 4];
        rng.fill_bytes(bytes);
        for (x, b) in chunk.iter_mut().zip(bytes.chunks_exact(4)) {
            let m = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            *x = if sign > 0 {
                x.wrapping_add(m)
            } else {
                x.wrapping_sub(m)
            };
        }
    }
}

/// Whether `a` adds (rather than takes) the pairwise mask it shares with `b`.
fn adds(a: SiteIndex, b: SiteIndex) -> i8 {
    if a < b { 1 } else { -1 }
}

/// Stage 3 at site `me`: its quantised input masked with its self mask and the pairwise masks
/// it agrees with each neighbour.
pub fn mask(
    ctx: &Context,
    me: SiteIndex,
    secrets: &SiteSecrets,
    seed: &SelfSeed,
    neighbours: &[(SiteIndex, PublicKeys)],
    input: &[u32],
) -> Result<Vec<u32>, SecAggError> {
    let mut out = input.to_vec();
    apply_stream(&seed.0, 1, &mut out);
    for (j, keys) in neighbours {
        let pairwise = ctx.derive(
            &agree(&secrets.masking, &keys.masking),
            "pairwise mask",
            me,
            *j,
        )?;
        apply_stream(&pairwise, adds(me, *j), &mut out);
    }
    Ok(out)
}

/// A share a site reveals to the server in stage 4.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reveal {
    /// Its share of a surviving neighbour's self-mask seed.
    Seed { of: SiteIndex, share: Vec<u8> },
    /// Its share of a dropped neighbour's mask key.
    MaskKey { of: SiteIndex, share: Vec<u8> },
}

/// Stage 4 at a site: for each neighbour whose shares it holds, the seed share of a survivor
/// or the mask-key share of one that dropped out. A site named in both lists is refused (the
/// server would learn that site's update).
pub fn reveal(
    held: &[HeldShare],
    survivors: &BTreeSet<SiteIndex>,
    dropped: &BTreeSet<SiteIndex>,
) -> Result<Vec<Reveal>, SecAggError> {
    if let Some(both) = survivors.intersection(dropped).next() {
        return Err(invalid(format!(
            "site {both} is named both as surviving and as dropped out: revealing both of its secrets would expose its update"
        )));
    }
    Ok(held
        .iter()
        .filter_map(|h| {
            if survivors.contains(&h.from) {
                Some(Reveal::Seed {
                    of: h.from,
                    share: h.seed.to_vec(),
                })
            } else if dropped.contains(&h.from) {
                Some(Reveal::MaskKey {
                    of: h.from,
                    share: h.mask_key.to_vec(),
                })
            } else {
                None
            }
        })
        .collect())
}

/// The round's graph: each site's neighbours (symmetric).
pub type Neighbourhoods = BTreeMap<SiteIndex, Vec<SiteIndex>>;

/// Stage 5 at the server: the sum of the survivors' inputs (every site in `masked` sent one;
/// every other site of `graph` dropped out), from the masked inputs and the revealed shares.
pub fn unmask(
    ctx: &Context,
    graph: &Neighbourhoods,
    keys: &BTreeMap<SiteIndex, PublicKeys>,
    masked: &BTreeMap<SiteIndex, Vec<u32>>,
    reveals: &BTreeMap<SiteIndex, Vec<Reveal>>,
    threshold: usize,
) -> Result<Vec<u32>, SecAggError> {
    let len = masked.values().next().map_or(0, Vec::len);
    if masked.values().any(|m| m.len() != len) {
        return Err(invalid("the masked inputs differ in length"));
    }
    if masked.is_empty() {
        return Err(invalid("no site sent a masked input"));
    }
    let mut sum = vec![0u32; len];
    for m in masked.values() {
        for (s, x) in sum.iter_mut().zip(m) {
            *s = s.wrapping_add(*x);
        }
    }
    // Each site's revealed shares, by kind, from distinct neighbours.
    let mut seeds: BTreeMap<SiteIndex, Vec<Vec<u8>>> = BTreeMap::new();
    let mut mask_keys: BTreeMap<SiteIndex, Vec<Vec<u8>>> = BTreeMap::new();
    for (by, list) in reveals {
        for r in list {
            let (of, share, into) = match r {
                Reveal::Seed { of, share } => (of, share, &mut seeds),
                Reveal::MaskKey { of, share } => (of, share, &mut mask_keys),
            };
            let own_seed = by == of && matches!(r, Reveal::Seed { .. });
            if !(own_seed || graph.get(of).is_some_and(|n| n.contains(by))) {
                return Err(invalid(format!(
                    "site {by} revealed a share of site {of}, which is not its neighbour"
                )));
            }
            into.entry(*of).or_default().push(share.clone());
        }
    }
    let rebuild = |site: SiteIndex, what: &'static str, shares: Option<&Vec<Vec<u8>>>| {
        let shares = shares.map(Vec::as_slice).unwrap_or_default();
        if shares.len() < threshold {
            return Err(SecAggError::BelowThreshold {
                site,
                what,
                got: shares.len(),
                threshold,
            });
        }
        let secret = Zeroizing::new(
            vsss_rs::Gf256::combine_array(&shares[..threshold])
                .map_err(|e| invalid(format!("rebuilding the {what} of site {site}: {e:?}")))?,
        );
        let bytes: [u8; 32] = secret
            .as_slice()
            .try_into()
            .map_err(|_| invalid(format!("the {what} of site {site} is not 32 bytes")))?;
        Ok(Zeroizing::new(bytes))
    };
    for site in masked.keys() {
        let seed = rebuild(*site, "self mask", seeds.get(site))?;
        apply_stream(&seed, -1, &mut sum);
    }
    for (site, neighbours) in graph {
        if masked.contains_key(site) {
            continue;
        }
        let key = StaticSecret::from(*rebuild(*site, "mask key", mask_keys.get(site))?);
        for i in neighbours.iter().filter(|i| masked.contains_key(i)) {
            let public = keys
                .get(i)
                .ok_or_else(|| invalid(format!("site {i} has no public keys")))?;
            // The mask survivor i added for the pair it formed with the dropped site.
            let pairwise = ctx.derive(&agree(&key, &public.masking), "pairwise mask", *i, *site)?;
            apply_stream(&pairwise, -adds(*i, *site), &mut sum);
        }
    }
    Ok(sum)
}

/// The fixed-point step of `quantise` for a clipping range of ±`clip`: the sum of weighted
/// inputs (weights summing to at most 1) stays within ±2^30 steps, inside 32 bits.
fn step(clip: f32) -> f64 {
    f64::from(clip) / f64::from(1u32 << 30)
}

/// A site's input: its change `values` clipped to ±`clip`, times its `weight` (its share of
/// the round's samples, public), in fixed point modulo 2^32. Returns it and how many values
/// were clipped.
pub fn quantise(values: &[f32], weight: f64, clip: f32) -> (Vec<u32>, usize) {
    let step = step(clip);
    let mut clipped = 0;
    let q = values
        .iter()
        .map(|&v| {
            let c = v.clamp(-clip, clip);
            clipped += usize::from(c != v || v.is_nan());
            let c = if c.is_nan() { 0.0 } else { c };
            ((weight * f64::from(c) / step).round() as i64) as i32 as u32
        })
        .collect();
    (q, clipped)
}

/// The weighted mean back from the sum of `quantise`d inputs.
pub fn dequantise(sum: &[u32], clip: f32) -> Vec<f32> {
    let step = step(clip);
    sum.iter()
        .map(|&s| (f64::from(s as i32) * step) as f32)
        .collect()
}

/// Clips every value of a site's change to ±`clip` (a NaN becomes 0); returns how many it
/// changed.
pub fn clip_values(values: &mut [f32], clip: f32) -> usize {
    let mut clipped = 0;
    for v in values.iter_mut() {
        let c = if v.is_nan() {
            0.0
        } else {
            v.clamp(-clip, clip)
        };
        clipped += usize::from(c.to_bits() != v.to_bits());
        *v = c;
    }
    clipped
}

/// A site's input in fixed point of `step` modulo 2^32: `values` (already weighted and, under
/// distributed noise, noised). The round's step keeps the sum within ±2^31 steps; one site's
/// value may wrap, the sum does not.
pub fn quantise_at(values: &[f64], step: f64) -> Vec<u32> {
    values
        .iter()
        .map(|&v| {
            let q = (v / step).round();
            // Saturating float-to-int, then the residue modulo 2^32.
            (q as i64) as u32
        })
        .collect()
}

/// The sum back from the sum of `quantise_at`'s inputs.
pub fn dequantise_at(sum: &[u32], step: f64) -> Vec<f32> {
    sum.iter()
        .map(|&s| (f64::from(s as i32) * step) as f32)
        .collect()
}

/// The graph among `members` only: a site that left before sharing its keys is nobody's
/// neighbour any more (the others masked without it).
pub fn restrict(graph: &Neighbourhoods, members: &BTreeSet<SiteIndex>) -> Neighbourhoods {
    graph
        .iter()
        .filter(|(s, _)| members.contains(s))
        .map(|(s, n)| {
            (
                *s,
                n.iter().copied().filter(|j| members.contains(j)).collect(),
            )
        })
        .collect()
}

/// The four exchanges of a round, in order, and what travels in each (through the server,
/// which sees only public keys, encrypted shares, masked inputs and the shares the protocol
/// lets it have).
pub mod wire {
    use super::{EncryptedShare, PublicKeys, Reveal, SiteIndex};
    use serde::{Deserialize, Serialize};
    use std::collections::BTreeSet;

    #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    pub enum Stage {
        /// Each site's two public keys and its training images (its public weight).
        Keys,
        /// Each site's encrypted shares, one per neighbour.
        Shares,
        /// The SHA-256 of each site's masked input, handed over as its job's output.
        Masked,
        /// Each site's shares of its surviving neighbours' seeds and dropped neighbours' keys.
        Reveals,
    }

    impl Stage {
        pub const ALL: [Stage; 4] = [Stage::Keys, Stage::Shares, Stage::Masked, Stage::Reveals];

        pub fn as_str(self) -> &'static str {
            match self {
                Stage::Keys => "keys",
                Stage::Shares => "shares",
                Stage::Masked => "masked",
                Stage::Reveals => "reveals",
            }
        }

        pub fn parse(s: &str) -> Option<Stage> {
            Stage::ALL.into_iter().find(|x| x.as_str() == s)
        }

        /// What a site that stopped before posting this stage is said to have done.
        pub fn dropped_before(self) -> &'static str {
            match self {
                Stage::Keys => "did not join the key exchange",
                Stage::Shares => "dropped out during the key exchange",
                Stage::Masked => "dropped out after the key exchange, before its masked input",
                Stage::Reveals => "dropped out after sending its masked input",
            }
        }
    }

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    pub struct KeysPost {
        pub keys: PublicKeys,
        /// Training images: the site's weight is its share of the round's images.
        pub samples: u64,
    }

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    pub struct Neighbour {
        pub index: SiteIndex,
        pub keys: PublicKeys,
    }

    /// What a site learns when the key exchange closes.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    pub struct KeysAnswer {
        pub index: SiteIndex,
        /// t: the shares that rebuild one of its secrets.
        pub threshold: usize,
        /// Sites in the exchange, and their training images in all.
        pub sites: usize,
        pub total_samples: u64,
        pub neighbours: Vec<Neighbour>,
    }

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    pub struct SharesPost {
        pub shares: Vec<EncryptedShare>,
    }

    /// The shares the site's neighbours sent it (a neighbour that sent none has left).
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    pub struct SharesAnswer {
        pub shares: Vec<EncryptedShare>,
    }

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    pub struct MaskedPost {
        /// SHA-256 of the masked input the site handed over as its job's output.
        pub sha256: String,
    }

    /// Who sent a masked input, and who shared its keys and then did not.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    pub struct MaskedAnswer {
        pub survivors: BTreeSet<SiteIndex>,
        pub dropped: BTreeSet<SiteIndex>,
    }

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    pub struct RevealsPost {
        pub reveals: Vec<Reveal>,
    }

    /// A masked input as bytes: its 32-bit words, little-endian.
    pub fn encode_masked(words: &[u32]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// The words of a masked input of `len` values, or why the bytes are not one.
    pub fn decode_masked(bytes: &[u8], len: usize) -> Result<Vec<u32>, String> {
        if bytes.len() != len * 4 {
            return Err(format!(
                "a masked input of this model is {} bytes ({len} values), not {}",
                len * 4,
                bytes.len()
            ));
        }
        Ok(bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
}

/// Bell et al.'s sparse graph: every site linked to its `k` nearest in a ring of the sites in
/// a random order (`k` even, at most n - 1; the complete graph when it reaches n - 1).
pub fn neighbourhoods(n: usize, k: usize, rng: &mut impl RngCore) -> Neighbourhoods {
    let mut order: Vec<SiteIndex> = (0..n as SiteIndex).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    let mut graph: Neighbourhoods = order.iter().map(|&s| (s, Vec::new())).collect();
    if k + 1 >= n {
        for &s in &order {
            graph.insert(s, order.iter().copied().filter(|&t| t != s).collect());
        }
        return graph;
    }
    let half = k.div_ceil(2);
    for (p, &s) in order.iter().enumerate() {
        let mut near = Vec::with_capacity(2 * half);
        for d in 1..=half {
            near.push(order[(p + d) % n]);
            near.push(order[(p + n - d) % n]);
        }
        near.sort_unstable();
        near.dedup();
        graph.insert(s, near);
    }
    graph
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::OsRng;

    /// The masked inputs by site.
    type Masked = BTreeMap<SiteIndex, Vec<u32>>;

    struct Site {
        secrets: SiteSecrets,
        seed: Option<SelfSeed>,
        held: Vec<HeldShare>,
    }

    fn ctx() -> Context {
        Context {
            run: Uuid::from_u128(7),
            round: 3,
        }
    }

    /// A whole round among `n` sites: `inputs[i]` at site i; `drop_before_input` never send
    /// their masked input, `drop_before_reveal` send it but not their shares.
    fn round(
        graph: &Neighbourhoods,
        inputs: &[Vec<u32>],
        threshold: usize,
        drop_before_input: &[SiteIndex],
        drop_before_reveal: &[SiteIndex],
    ) -> Result<(Vec<u32>, Masked), SecAggError> {
        let n = inputs.len() as SiteIndex;
        let mut sites: BTreeMap<SiteIndex, Site> = (0..n)
            .map(|i| {
                (
                    i,
                    Site {
                        secrets: SiteSecrets::generate(&mut OsRng),
                        seed: None,
                        held: Vec::new(),
                    },
                )
            })
            .collect();
        let keys: BTreeMap<SiteIndex, PublicKeys> = sites
            .iter()
            .map(|(i, s)| (*i, s.secrets.public()))
            .collect();
        let of = |i: SiteIndex| -> Vec<(SiteIndex, PublicKeys)> {
            graph[&i].iter().map(|j| (*j, keys[j])).collect()
        };
        // Stage 2, relayed: every share reaches its neighbour.
        let mut mail: Vec<EncryptedShare> = Vec::new();
        for (i, s) in sites.iter_mut() {
            let (seed, shares) =
                share_keys(&ctx(), *i, &s.secrets, &of(*i), threshold, &mut OsRng)?;
            s.held.push(seed.own_share());
            s.seed = Some(seed);
            mail.extend(shares);
        }
        for share in &mail {
            let to = sites.get_mut(&share.to).expect("a site");
            let held = open_share(&ctx(), share.to, &to.secrets, &keys[&share.from], share)?;
            to.held.push(held);
        }
        // Stage 3.
        let mut masked = BTreeMap::new();
        for (i, s) in &sites {
            if drop_before_input.contains(i) {
                continue;
            }
            let seed = s.seed.as_ref().expect("shared");
            masked.insert(
                *i,
                mask(&ctx(), *i, &s.secrets, seed, &of(*i), &inputs[*i as usize])?,
            );
        }
        // Stage 4.
        let survivors: BTreeSet<SiteIndex> = masked.keys().copied().collect();
        let dropped: BTreeSet<SiteIndex> = (0..n).filter(|i| !survivors.contains(i)).collect();
        let mut reveals = BTreeMap::new();
        for (i, s) in &sites {
            if drop_before_input.contains(i) || drop_before_reveal.contains(i) {
                continue;
            }
            reveals.insert(*i, reveal(&s.held, &survivors, &dropped)?);
        }
        let sum = unmask(&ctx(), graph, &keys, &masked, &reveals, threshold)?;
        Ok((sum, masked))
    }

    fn plain_sum(inputs: &[Vec<u32>], without: &[SiteIndex]) -> Vec<u32> {
        let mut sum = vec![0u32; inputs[0].len()];
        for (i, x) in inputs.iter().enumerate() {
            if without.contains(&(i as SiteIndex)) {
                continue;
            }
            for (s, v) in sum.iter_mut().zip(x) {
                *s = s.wrapping_add(*v);
            }
        }
        sum
    }

    fn updates(n: usize, len: usize) -> (Vec<Vec<f32>>, Vec<f64>) {
        let values = (0..n)
            .map(|i| {
                (0..len)
                    .map(|j| ((i * 31 + j * 7) % 17) as f32 / 17.0 - 0.5)
                    .collect()
            })
            .collect();
        let samples: Vec<f64> = (0..n).map(|i| 10.0 + i as f64 * 5.0).collect();
        let total: f64 = samples.iter().sum();
        (values, samples.iter().map(|s| s / total).collect())
    }

    #[test]
    fn the_sum_of_masked_updates_is_the_weighted_sum() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let graph = neighbourhoods(5, 4, &mut rng);
        assert!(graph.values().all(|n| n.len() == 4), "complete: {graph:?}");
        let (values, weights) = updates(5, 1000);
        let inputs: Vec<Vec<u32>> = values
            .iter()
            .zip(&weights)
            .map(|(v, w)| quantise(v, *w, 1.0).0)
            .collect();
        let (sum, masked) = round(&graph, &inputs, 3, &[], &[]).expect("the round");
        assert_eq!(sum, plain_sum(&inputs, &[]));
        let mean = dequantise(&sum, 1.0);
        for j in 0..1000 {
            let expected: f64 = values
                .iter()
                .zip(&weights)
                .map(|(v, w)| f64::from(v[j]) * w)
                .sum();
            assert!(
                (f64::from(mean[j]) - expected).abs() < 1e-6,
                "{j}: {} vs {expected}",
                mean[j]
            );
        }
        // One masked input says nothing of its update: no correlation with it.
        let x: Vec<f64> = inputs[0].iter().map(|&q| f64::from(q as i32)).collect();
        let y: Vec<f64> = masked[&0].iter().map(|&q| f64::from(q as i32)).collect();
        assert!(correlation(&x, &y).abs() < 0.1, "{}", correlation(&x, &y));
    }

    fn correlation(x: &[f64], y: &[f64]) -> f64 {
        let n = x.len() as f64;
        let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
        let cov: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
        let vx: f64 = x.iter().map(|a| (a - mx).powi(2)).sum();
        let vy: f64 = y.iter().map(|b| (b - my).powi(2)).sum();
        cov / (vx * vy).sqrt()
    }

    #[test]
    fn sites_that_drop_out_are_recovered_and_below_threshold_the_round_fails() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let graph = neighbourhoods(5, 4, &mut rng);
        let (values, weights) = updates(5, 64);
        let inputs: Vec<Vec<u32>> = values
            .iter()
            .zip(&weights)
            .map(|(v, w)| quantise(v, *w, 1.0).0)
            .collect();
        // Site 1 drops after the key exchange, site 3 after sending its masked input: the
        // sum is that of sites 0, 2, 3 and 4 (site 1's key from the three neighbours left, a
        // survivor's seed from itself and two others: the threshold here).
        let (sum, _) = round(&graph, &inputs, 3, &[1], &[3]).expect("recovered");
        assert_eq!(sum, plain_sum(&inputs, &[1]));
        // With a threshold of 4 of the five holders the same two leave too few.
        let err = round(&graph, &inputs, 4, &[1], &[3]).unwrap_err();
        assert!(
            matches!(
                err,
                SecAggError::BelowThreshold {
                    got: 3,
                    threshold: 4,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("3 of the sites holding its shares answered, the threshold is 4"),
            "{err}"
        );
    }

    #[test]
    fn a_sparse_graph_sums_too() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let graph = neighbourhoods(12, 4, &mut rng);
        assert!(graph.values().all(|n| n.len() == 4));
        for (a, ns) in &graph {
            for b in ns {
                assert!(graph[b].contains(a), "symmetric");
            }
        }
        let (values, weights) = updates(12, 32);
        let inputs: Vec<Vec<u32>> = values
            .iter()
            .zip(&weights)
            .map(|(v, w)| quantise(v, *w, 1.0).0)
            .collect();
        let (sum, _) = round(&graph, &inputs, 3, &[5], &[]).expect("the round");
        assert_eq!(sum, plain_sum(&inputs, &[5]));
    }

    #[test]
    fn shares_are_bound_to_their_sites_and_round_and_both_secrets_are_never_revealed() {
        let (a, b) = (
            SiteSecrets::generate(&mut OsRng),
            SiteSecrets::generate(&mut OsRng),
        );
        let c = SiteSecrets::generate(&mut OsRng);
        let (_, shares) = share_keys(
            &ctx(),
            0,
            &a,
            &[(1, b.public()), (2, c.public())],
            2,
            &mut OsRng,
        )
        .expect("shares");
        assert!(open_share(&ctx(), 1, &b, &a.public(), &shares[0]).is_ok());
        // Another round's context, another recipient, an altered byte: refused.
        let later = Context { round: 4, ..ctx() };
        assert!(open_share(&later, 1, &b, &a.public(), &shares[0]).is_err());
        assert!(open_share(&ctx(), 2, &c, &a.public(), &shares[0]).is_err());
        let mut altered = shares[0].clone();
        altered.ciphertext[5] ^= 1;
        assert!(open_share(&ctx(), 1, &b, &a.public(), &altered).is_err());
        let held = open_share(&ctx(), 1, &b, &a.public(), &shares[0]).expect("share");
        let both: BTreeSet<SiteIndex> = [0].into();
        assert!(reveal(&[held], &both, &both).is_err());
        // A threshold below 2 or above the neighbourhood and the site is refused.
        assert!(share_keys(&ctx(), 0, &a, &[(1, b.public())], 1, &mut OsRng).is_err());
        assert!(share_keys(&ctx(), 0, &a, &[(1, b.public())], 3, &mut OsRng).is_err());
    }

    #[test]
    fn quantisation_clips_and_counts() {
        let (q, clipped) = quantise(&[0.5, -2.0, f32::NAN], 1.0, 1.0);
        assert_eq!(clipped, 2);
        let back = dequantise(&q, 1.0);
        assert!((back[0] - 0.5).abs() < 1e-6 && (back[1] + 1.0).abs() < 1e-6 && back[2] == 0.0);
    }
}
