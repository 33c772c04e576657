//! The strategies: each chooses one of `usable` (indices into the balancer's entries, all up,
//! all with weight above 0, none already tried by the asking session). Pure functions over the
//! few numbers they need, so their orders and distributions are tested exactly.

use std::time::Instant;

use super::{BackendId, Balancer, Entry, NoPick, Pick, Tried};
use crate::config::{Balance, EgressId, EgressStrategy};

use std::net::{IpAddr, SocketAddr};

/// What a strategy sees of a backend.
pub(super) trait Weighed {
    fn weight(&self) -> u32;
    fn active(&self) -> u64;
    fn addr(&self) -> SocketAddr;
    /// Smooth weighted round robin's running score.
    fn current(&mut self) -> &mut i64;
}

/// The first usable entry at or after `cursor`, which then moves past it.
pub(super) fn round_robin(usable: &[usize], len: usize, cursor: &mut usize) -> usize {
    let pick = *usable
        .iter()
        .min_by_key(|&&i| (i + len - *cursor % len) % len)
        .expect("strategies are only asked with something usable");
    *cursor = (pick + 1) % len;
    pick
}

/// nginx's smooth weighted round robin: every usable entry gains its weight, the highest score
/// wins and pays the total back. Weights 5:1:1 give a a b a c a a, never a burst of five.
pub(super) fn smooth_weighted<E: Weighed>(entries: &mut [E], usable: &[usize]) -> usize {
    let total: i64 = usable.iter().map(|&i| i64::from(entries[i].weight())).sum();
    let mut best = usable[0];
    for &i in usable {
        let weight = i64::from(entries[i].weight());
        *entries[i].current() += weight;
        if *entries[i].current() > *entries[best].current() {
            best = i;
        }
    }
    *entries[best].current() -= total;
    best
}

/// Fewest live sessions per unit of weight; ties go round robin from `cursor`.
pub(super) fn least_connections<E: Weighed>(entries: &[E], usable: &[usize], cursor: &mut usize) -> usize {
    // a/wa < b/wb  ⇔  a·wb < b·wa: no division, no rounding.
    let load = |i: usize| (u128::from(entries[i].active()), u128::from(entries[i].weight()));
    let least = usable.iter().copied().fold(None::<usize>, |best, i| match best {
        Some(b) if load(b).0 * load(i).1 <= load(i).0 * load(b).1 => Some(b),
        _ => Some(i),
    });
    let (active, weight) = load(least.expect("strategies are only asked with something usable"));
    let tied: Vec<usize> = usable
        .iter()
        .copied()
        .filter(|&i| load(i).0 * weight == active * load(i).1)
        .collect();
    round_robin(&tied, entries.len(), cursor)
}

/// Weighted rendezvous hashing: every (client, backend) pair gets a score, the highest wins. A
/// client keeps its backend while that backend stays; removing one moves only its own clients.
pub(super) fn source_hash<E: Weighed>(entries: &[E], usable: &[usize], client: IpAddr) -> usize {
    let score = |i: usize| {
        let h = mix(hash_ip(client) ^ hash_addr(entries[i].addr()).rotate_left(17));
        // Uniform in (0, 1], then the standard weighted form w / -ln(u).
        let u = ((h >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        f64::from(entries[i].weight()) / -u.ln().min(-f64::MIN_POSITIVE)
    };
    *usable
        .iter()
        .max_by(|&&a, &&b| score(a).total_cmp(&score(b)))
        .expect("strategies are only asked with something usable")
}

/// Power of two choices: two distinct random picks, the less loaded (per unit of weight) wins.
pub(super) fn two_choices<E: Weighed>(entries: &[E], usable: &[usize], rng: &mut fastrand::Rng) -> usize {
    if usable.len() == 1 {
        return usable[0];
    }
    let a = rng.usize(..usable.len());
    let b = (a + 1 + rng.usize(..usable.len() - 1)) % usable.len();
    let (a, b) = (usable[a], usable[b]);
    // active_a / weight_a <= active_b / weight_b, cross-multiplied.
    let scaled = |i: usize, by: usize| u128::from(entries[i].active()) * u128::from(entries[by].weight());
    if scaled(a, b) <= scaled(b, a) { a } else { b }
}

/// FNV-1a: the same on every build and every run, unlike std's hasher.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn hash_ip(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => fnv(&v4.octets()),
        IpAddr::V6(v6) => fnv(&v6.octets()),
    }
}

fn hash_addr(addr: SocketAddr) -> u64 {
    hash_ip(addr.ip()) ^ fnv(&addr.port().to_be_bytes()).rotate_left(31)
}

/// splitmix64's finaliser: spreads every input bit over the output.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Choosing a pair: the strategies above, over what is usable now.
impl Balancer {
    pub(super) fn egress_list(&self, entry: &Entry) -> &[EgressId] {
        &self.sources[entry.source].egress
    }

    pub(super) fn egress_usable(&self, egress: EgressId) -> bool {
        self.egresses.get(egress.0).is_some_and(|e| e.down.is_none())
    }

    /// Up, and not drained by the operator: a new session may leave by it.
    fn egress_open(&self, egress: EgressId) -> bool {
        self.egress_usable(egress) && !self.egress_drained(egress)
    }

    /// The egresses `entry` may still leave by for a session that tried `tried`.
    fn open_egresses(&self, entry: &Entry, tried: &[Tried]) -> Vec<EgressId> {
        let failed_by = |g: EgressId| tried.iter().any(|t| t.backend == entry.id && t.egress == Some(g));
        (self.egress_list(entry).iter().copied())
            .filter(|g| self.egress_open(*g) && !failed_by(*g))
            .collect()
    }

    /// The next of `usable` (usable egresses) by the route's egress strategy.
    fn next_egress(&mut self, usable: &[EgressId]) -> Option<EgressId> {
        let egress = match self.egress_strategy {
            EgressStrategy::Failover => usable.first().copied(),
            EgressStrategy::RoundRobin => usable.get(self.egress_cursor % usable.len().max(1)).copied(),
        };
        self.egress_cursor = self.egress_cursor.wrapping_add(1);
        egress
    }

    /// An egress of the route for a target a client named (CONNECT), other than `avoid`.
    pub(super) fn client_egress(&mut self, avoid: &[EgressId]) -> Result<EgressId, NoPick> {
        let list = self.route_egress.clone();
        let usable: Vec<EgressId> = (list.iter().copied())
            .filter(|g| self.egress_open(*g) && !avoid.contains(g))
            .collect();
        self.next_egress(&usable).ok_or_else(|| self.egresses_down(&list))
    }

    /// Why none of `list` is usable: the first one down (or drained) and why, or that each
    /// was tried.
    fn egresses_down(&self, list: &[EgressId]) -> NoPick {
        let down = list.iter().find_map(|g| {
            let why = match self.egress_drained(*g) {
                true => "drained by the admin".into(),
                false => self.egresses.get(g.0)?.down.clone()?,
            };
            let egress = self.egress_names[g.0].clone();
            Some(NoPick::EgressDown { egress, why })
        });
        down.unwrap_or(NoPick::EveryEgressTried)
    }

    pub(super) fn pick(&mut self, client: IpAddr, tried: &[Tried]) -> Result<Pick, NoPick> {
        let now = Instant::now();
        let failed = |id: BackendId| tried.iter().any(|t| t.backend == id && t.egress.is_none());
        let usable: Vec<usize> = (self.entries.iter().enumerate())
            .filter(|(_, e)| e.in_service() && !failed(e.id) && e.health.usable(now))
            .filter(|(_, e)| !self.open_egresses(e, tried).is_empty())
            .map(|(i, _)| i)
            .collect();
        if usable.is_empty() {
            return Err(self.why_none(tried, now));
        }
        let i = match self.strategy {
            // Round robin honours weights, as HAProxy's and nginx's do; with equal weights it is
            // the plain rotation.
            Balance::RoundRobin | Balance::WeightedRoundRobin => smooth_weighted(&mut self.entries, &usable),
            Balance::LeastConnections => least_connections(&self.entries, &usable, &mut self.cursor),
            Balance::SourceHash => source_hash(&self.entries, &usable, client),
            Balance::Random => two_choices(&self.entries, &usable, &mut self.rng),
        };
        let open = self.open_egresses(&self.entries[i], tried);
        let egress = self.next_egress(&open).expect("a usable backend has an open egress");
        // Counted now, as HAProxy does: a connect in flight is load for least-connections too.
        let entry = &mut self.entries[i];
        entry.active += 1;
        entry.sessions += 1;
        Ok(Pick {
            backend: entry.id,
            addr: entry.addr,
            egress,
            report_success: entry.health.success_is_news(),
        })
    }

    /// Why no pair is left.
    fn why_none(&self, tried: &[Tried], now: Instant) -> NoPick {
        let serving: Vec<&Entry> = (self.entries.iter()).filter(|e| e.in_service()).collect();
        if serving.is_empty() {
            return NoPick::NoneInService;
        }
        let untried: Vec<&Entry> = (serving.iter().copied())
            .filter(|e| !tried.iter().any(|t| t.backend == e.id && t.egress.is_none()))
            .collect();
        if untried.is_empty() {
            return NoPick::EveryBackendTried;
        }
        let healthy: Vec<&Entry> = (untried.iter().copied()).filter(|e| e.health.usable(now)).collect();
        if healthy.is_empty() {
            return NoPick::NoneHealthy;
        }
        let lists: Vec<EgressId> = healthy
            .iter()
            .flat_map(|e| self.egress_list(e).iter().copied())
            .collect();
        self.egresses_down(&lists)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone)]
    struct B {
        addr: SocketAddr,
        weight: u32,
        active: u64,
        current: i64,
    }

    impl Weighed for B {
        fn weight(&self) -> u32 {
            self.weight
        }
        fn active(&self) -> u64 {
            self.active
        }
        fn addr(&self) -> SocketAddr {
            self.addr
        }
        fn current(&mut self) -> &mut i64 {
            &mut self.current
        }
    }

    fn backends(weights: &[u32]) -> Vec<B> {
        (weights.iter().enumerate())
            .map(|(i, &weight)| B {
                addr: SocketAddr::from(([10, 0, 0, i as u8 + 1], 80)),
                weight,
                active: 0,
                current: 0,
            })
            .collect()
    }

    #[test]
    fn round_robin_skips_what_is_not_usable() {
        let mut cursor = 0;
        let order: Vec<usize> = (0..6).map(|_| round_robin(&[0, 2, 3], 4, &mut cursor)).collect();
        assert_eq!(order, [0, 2, 3, 0, 2, 3]);
    }

    #[test]
    fn smooth_weighted_interleaves_five_one_one() {
        let mut b = backends(&[5, 1, 1]);
        let order: String = (0..14)
            .map(|_| ["a", "b", "c"][smooth_weighted(&mut b, &[0, 1, 2])])
            .collect();
        assert_eq!(order, "aabacaaaabacaa");
    }

    #[test]
    fn least_connections_follows_open_counts_and_weights() {
        let mut b = backends(&[1, 1, 2]);
        (b[0].active, b[1].active, b[2].active) = (3, 1, 3);
        let mut cursor = 0;
        assert_eq!(least_connections(&b, &[0, 1, 2], &mut cursor), 1);
        b[1].active = 2;
        // 3/1, 2/1, 3/2: the weighted one is least loaded.
        assert_eq!(least_connections(&b, &[0, 1, 2], &mut cursor), 2);
        // A tie goes round robin.
        let tied = backends(&[1, 1, 1]);
        let picks: Vec<usize> = (0..3)
            .map(|_| least_connections(&tied, &[0, 1, 2], &mut cursor))
            .collect();
        let mut sorted = picks.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, [0, 1, 2], "{picks:?}");
    }

    #[test]
    fn source_hash_is_stable_and_moves_few_clients_when_a_backend_goes() {
        let b = backends(&[1; 10]);
        let all: Vec<usize> = (0..10).collect();
        let clients: Vec<IpAddr> = (0..5000u32)
            .map(|n| IpAddr::from((0xc000_0000u32 + n).to_be_bytes()))
            .collect();
        let before: Vec<usize> = clients.iter().map(|c| source_hash(&b, &all, *c)).collect();
        let again: Vec<usize> = clients.iter().map(|c| source_hash(&b, &all, *c)).collect();
        assert_eq!(before, again, "the same client gets the same backend");
        let mut counts = [0usize; 10];
        before.iter().for_each(|&i| counts[i] += 1);
        assert!(counts.iter().all(|&n| (350..650).contains(&n)), "spread: {counts:?}");
        let without_3: Vec<usize> = all.iter().copied().filter(|&i| i != 3).collect();
        let after: Vec<usize> = clients.iter().map(|c| source_hash(&b, &without_3, *c)).collect();
        let moved = before.iter().zip(&after).filter(|(x, y)| x != y).count();
        assert_eq!(moved, counts[3], "only the removed backend's clients move");
    }

    #[test]
    fn two_choices_never_picks_outside_usable_and_prefers_the_less_loaded() {
        let mut b = backends(&[1, 1, 1, 1]);
        b[1].active = 100;
        let mut rng = fastrand::Rng::with_seed(7);
        let mut counts = [0usize; 4];
        for _ in 0..3000 {
            let pick = two_choices(&b, &[1, 2], &mut rng);
            counts[pick] += 1;
        }
        assert_eq!((counts[0], counts[3]), (0, 0), "down backends are never picked");
        assert_eq!(counts[1], 0, "between a loaded and an idle backend, the idle one wins");
        let spread: Vec<usize> = {
            let mut counts = [0usize; 4];
            (0..4000).for_each(|_| counts[two_choices(&backends(&[1; 4]), &[0, 1, 2, 3], &mut rng)] += 1);
            counts.to_vec()
        };
        assert!(spread.iter().all(|&n| n > 700), "{spread:?}");
    }
}
