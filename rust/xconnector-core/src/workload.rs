//! Seeded request streams with the prefix reuse real deployments see, for `xconnector bench`.
//!
//! Three kinds of traffic, interleaved at random (seeded, so a run is reproducible):
//!
//! - chat: conversations sharing one system prompt; each turn resends the whole history plus a
//!   new user message (and the previous answer), so turn n reuses turn n-1's prompt;
//! - rag: questions over a fixed set of documents, popular ones far more often (Zipf); each
//!   prompt is a document followed by a question;
//! - agent: loops whose context grows by a tool result each step, resent every step.
//!
//! Token ids are random in [1, 32000); lengths are in tokens.

/// SplitMix64: small, fast, and the same stream for a seed on every machine.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi] (both included), `lo <= hi`.
    pub fn between(&mut self, lo: usize, hi: usize) -> usize {
        let span = (hi - lo + 1) as u128;
        lo + ((u128::from(self.next_u64()) * span) >> 64) as usize
    }

    /// An index drawn with probability proportional to `weights[i]`.
    pub fn weighted(&mut self, weights: &[f64]) -> usize {
        let mut x = self.unit() * weights.iter().sum::<f64>();
        for (i, w) in weights.iter().enumerate() {
            if x < *w {
                return i;
            }
            x -= w;
        }
        weights.len() - 1
    }

    fn text(&mut self, n: usize) -> Vec<u32> {
        (0..n).map(|_| self.between(1, 31_999) as u32).collect()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Rag,
    Agent,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: Kind,
    pub tokens: Vec<u32>,
}

/// The shape of the traffic; `Default` is what `xconnector bench` replays.
#[derive(Clone, Debug)]
pub struct WorkloadConfig {
    pub system_tokens: usize,
    pub documents: usize,
    pub document_tokens: usize,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        Self { system_tokens: 1024, documents: 40, document_tokens: 2048 }
    }
}

/// `n` requests of mixed chat, RAG and agent traffic, the same for the same `seed`.
pub fn requests(n: usize, seed: u64, cfg: &WorkloadConfig) -> Vec<Request> {
    let mut rng = Rng::new(seed);
    let system = rng.text(cfg.system_tokens);
    let docs: Vec<Vec<u32>> = (0..cfg.documents).map(|_| rng.text(cfg.document_tokens)).collect();
    let zipf: Vec<f64> = (0..cfg.documents).map(|i| 1.0 / (i + 1) as f64).collect(); // a few documents are most asked
    let mut chats: Vec<Vec<u32>> = Vec::new();
    let mut agents: Vec<Vec<u32>> = Vec::new();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        match rng.weighted(&[0.45, 0.35, 0.2]) {
            0 => {
                if chats.last().is_none_or(|c| c.len() > 6000) || rng.unit() < 0.15 {
                    chats.push(system.clone());
                }
                let at = rng.between(0, chats.len() - 1);
                let user = rng.between(20, 120);
                chats[at].extend(rng.text(user)); // the user's message
                out.push(Request { kind: Kind::Chat, tokens: chats[at].clone() });
                let answer = rng.between(50, 300);
                chats[at].extend(rng.text(answer)); // the answer, resent next turn
            }
            1 if !docs.is_empty() => {
                let mut tokens = docs[rng.weighted(&zipf)].clone();
                let question = rng.between(15, 60);
                tokens.extend(rng.text(question));
                out.push(Request { kind: Kind::Rag, tokens });
            }
            _ => {
                if agents.last().is_none_or(|a| a.len() > 8000) || rng.unit() < 0.1 {
                    let mut context = system.clone();
                    context.extend(rng.text(200));
                    agents.push(context);
                }
                let at = rng.between(0, agents.len() - 1);
                let tool = rng.between(100, 600);
                agents[at].extend(rng.text(tool)); // a tool's output
                out.push(Request { kind: Kind::Agent, tokens: agents[at].clone() });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default(n: usize, seed: u64) -> Vec<Request> {
        requests(n, seed, &WorkloadConfig::default())
    }

    #[test]
    fn a_seed_gives_the_same_requests_and_another_seed_others() {
        assert_eq!(default(300, 7), default(300, 7));
        assert_ne!(default(300, 7), default(300, 8));
        // A longer run starts with the shorter one.
        assert_eq!(default(100, 7)[..], default(300, 7)[..100]);
    }

    #[test]
    fn the_kinds_interleave_in_about_their_proportions() {
        let reqs = default(1000, 0);
        let count = |k: Kind| reqs.iter().filter(|r| r.kind == k).count();
        let (chat, rag, agent) = (count(Kind::Chat), count(Kind::Rag), count(Kind::Agent));
        assert_eq!(chat + rag + agent, 1000);
        assert!((350..550).contains(&chat) && (250..450).contains(&rag) && (120..280).contains(&agent));
        // Interleaved, not in runs of one kind: about 1 - (0.45² + 0.35² + 0.2²) = 62% of
        // neighbours differ.
        let switches = reqs.windows(2).filter(|w| w[0].kind != w[1].kind).count();
        assert!(switches > 500, "{switches} switches");
        for window in reqs.chunks(50) {
            assert!(window.iter().any(|r| r.kind == Kind::Chat) && window.iter().any(|r| r.kind == Kind::Rag));
        }
    }

    #[test]
    fn requests_share_the_prefixes_their_kind_promises() {
        let cfg = WorkloadConfig::default();
        let reqs = default(500, 3);
        let system = &reqs.iter().find(|r| r.kind == Kind::Chat).unwrap().tokens[..cfg.system_tokens];
        for r in &reqs {
            assert!(r.tokens.iter().all(|&t| (1..32_000).contains(&t)));
            match r.kind {
                // Chats and agent loops start with the system prompt and grow past it.
                Kind::Chat => assert!(r.tokens.len() >= cfg.system_tokens + 20 && r.tokens.starts_with(system)),
                Kind::Agent => assert!(r.tokens.len() >= cfg.system_tokens + 300 && r.tokens.starts_with(system)),
                // A document and a question of 15 to 60 tokens.
                Kind::Rag => assert!((cfg.document_tokens + 15..=cfg.document_tokens + 60).contains(&r.tokens.len())),
            }
        }
        // A conversation's next turn resends the previous one whole.
        let chats: Vec<&Request> = reqs.iter().filter(|r| r.kind == Kind::Chat).collect();
        let continued = chats
            .iter()
            .filter(|r| chats.iter().any(|p| p.tokens.len() < r.tokens.len() && r.tokens.starts_with(&p.tokens)))
            .count();
        assert!(continued > chats.len() / 2, "{continued} of {} chat turns continue an earlier one", chats.len());
        // Popular documents are asked again and again.
        let rags: Vec<&[u32]> =
            reqs.iter().filter(|r| r.kind == Kind::Rag).map(|r| &r.tokens[..cfg.document_tokens]).collect();
        let distinct: std::collections::HashSet<&[u32]> = rags.iter().copied().collect();
        assert!(distinct.len() <= cfg.documents && distinct.len() * 2 < rags.len());
    }

    #[test]
    fn draws_stay_in_range() {
        let mut rng = Rng::new(1);
        for _ in 0..10_000 {
            assert!((20..=120).contains(&rng.between(20, 120)));
            assert!((0.0..1.0).contains(&rng.unit()));
            assert!(rng.weighted(&[0.0, 1.0, 0.0]) == 1);
        }
        assert_eq!(rng.between(5, 5), 5);
    }
}
