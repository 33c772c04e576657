//! The Balancer actor's own logic: ejection, draining, egress failover, retirement.

use super::*;
use crate::config::{Config, Settings};

const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 7));

fn settings(route: &str) -> Settings {
    let text = format!(r#"(egress: {{"a": (), "b": ()}}, routes: [(name: "r", listen: "127.0.0.1:0", {route})])"#);
    Config::parse(&text, "test").unwrap().validate().unwrap()
}

fn balancer(route: &str) -> Balancer {
    let s = settings(route);
    let names: Arc<[Arc<str>]> = s.egress.iter().map(|e| e.name.as_str().into()).collect();
    Balancer::new(&s.routes[0], names, Arc::default(), true)
}

fn ports(b: &mut Balancer, n: usize) -> Vec<u16> {
    (0..n)
        .map(|_| b.pick(CLIENT, &[]).map_or(0, |p| p.addr.port()))
        .collect()
}

const THREE: &str = r#"backends: [(addr: "127.0.0.1:1"), (addr: "127.0.0.1:2"), (addr: "127.0.0.1:3")]"#;

#[test]
fn failed_connects_take_a_backend_out_and_sessions_only_get_healthy_ones() {
    let mut b = balancer(&format!(r#"{THREE}, health: (fall: 2, cooldown: "1m")"#));
    let second = b.entries[1].id;
    for _ in 0..2 {
        b.connected(second, refused());
    }
    assert_eq!(ports(&mut b, 4), [1, 3, 1, 3]);
    assert_eq!(b.snapshot().0[1].state, HealthState::Down);
    assert_eq!(b.stats.health_changes(), 1);
    // All down: the pick fails at once rather than waiting on connects.
    for entry in [b.entries[0].id, b.entries[2].id] {
        b.connected(entry, refused());
        b.connected(entry, refused());
    }
    assert_eq!(b.pick(CLIENT, &[]), Err(NoPick::NoneHealthy));
}

fn refused() -> Result<(), (Fault, String)> {
    Err((Fault::Backend, "connection refused".into()))
}

#[test]
fn weight_zero_drains_and_weights_interleave() {
    let mut b = balancer(
        r#"balance: WeightedRoundRobin, backends: [(addr: "127.0.0.1:1", weight: 5), (addr: "127.0.0.1:2"), (addr: "127.0.0.1:3"), (addr: "127.0.0.1:4", weight: 0)]"#,
    );
    assert_eq!(ports(&mut b, 7), [1, 1, 2, 1, 3, 1, 1]);
    assert_eq!(b.snapshot().0[3].state, HealthState::Draining);
}

#[test]
fn an_egress_is_out_on_the_dialers_word_only_and_says_why() {
    let mut b = balancer(&format!(r#"egress: ["a", "b"], egress_strategy: Failover, {THREE}"#));
    let (a, e_b) = (EgressId(1), EgressId(2));
    let first = b.pick(CLIENT, &[]).unwrap();
    assert_eq!(first.egress, a);
    // An egress or path fault is nobody's health here: the backend keeps its record.
    b.connected(first.backend, Err((Fault::Path, "network unreachable".into())));
    b.connected(first.backend, Err((Fault::Egress, "cannot bind".into())));
    assert_eq!(b.entries[0].connect_failures, 0, "not the backend's fault");
    assert_eq!(
        b.pick(CLIENT, &[]).unwrap().egress,
        a,
        "nor the egress's, until the Dialer says so"
    );
    b.egress_news(a, Some("carrier lost on up1".into()), 1);
    assert_eq!(
        b.pick(CLIENT, &[]).unwrap().egress,
        e_b,
        "traffic leaves by the other egress"
    );
    assert!(!b.snapshot().1[0].up && b.snapshot().1[1].up);
    b.egress_news(a, None, 2);
    assert_eq!(
        b.pick(CLIENT, &[]).unwrap().egress,
        a,
        "failover returns to the first once it is back"
    );
    b.egress_news(e_b, Some("interface up2 is gone".into()), 3);
    b.egress_news(a, Some("carrier lost on up1".into()), 4);
    assert_eq!(
        b.pick(CLIENT, &[]),
        Err(NoPick::EgressDown {
            egress: "a".into(),
            why: "carrier lost on up1".into()
        }),
        "no egress up: fail fast, and say why"
    );
}

#[test]
fn a_pair_that_failed_is_not_offered_again_but_the_backend_is_by_another_egress() {
    let mut b = balancer(r#"egress: ["a", "b"], egress_strategy: Failover, backends: [(addr: "127.0.0.1:1")]"#);
    let first = b.pick(CLIENT, &[]).unwrap();
    let tried = [Tried {
        backend: first.backend,
        egress: Some(first.egress),
    }];
    let second = b.pick(CLIENT, &tried).unwrap();
    assert_eq!((second.backend, second.egress), (first.backend, EgressId(2)));
    let both = [
        tried[0],
        Tried {
            backend: first.backend,
            egress: Some(EgressId(2)),
        },
    ];
    assert_eq!(b.pick(CLIENT, &both), Err(NoPick::EveryEgressTried));
    let failed = [Tried {
        backend: first.backend,
        egress: None,
    }];
    assert_eq!(b.pick(CLIENT, &failed), Err(NoPick::EveryBackendTried));
}

#[test]
fn a_vanished_address_retires_and_goes_when_its_sessions_end() {
    let mut b = balancer(r#"backends: [(addr: "127.0.0.1:1")]"#);
    let old = b.pick(CLIENT, &[]).unwrap();
    b.connected(old.backend, Ok(()));
    let new_addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    b.resolved(0, vec![new_addr]);
    assert_eq!(
        b.pick(CLIENT, &[]).unwrap().addr,
        new_addr,
        "new sessions go to the new address"
    );
    assert_eq!(
        b.snapshot().0[0].state,
        HealthState::Retired,
        "the old one keeps its live session"
    );
    b.closed(old.backend);
    assert_eq!(b.snapshot().0.len(), 1);
}

#[test]
fn the_actor_serves_its_handle() {
    let s = settings(THREE);
    let names: Arc<[Arc<str>]> = s.egress.iter().map(|e| e.name.as_str().into()).collect();
    let (handle, task) = BalancerHandle::spawn(&s.routes[0], names, Arc::default(), 8);
    let (first, snapshot) = rt::block_on(async {
        let first = handle.pick(CLIENT, &[]).await.unwrap().unwrap();
        handle.connected(&first, Ok(())).await.unwrap();
        (first, handle.snapshot().await.unwrap())
    });
    assert_eq!(first.addr.port(), 1);
    assert_eq!((snapshot.0[0].active, snapshot.0[0].sessions), (1, 1));
    drop(handle);
    rt::block_on(futures::future::join_all(task));
}

#[test]
fn a_pick_counts_its_session_and_a_failed_connect_takes_it_back() {
    let mut b = balancer(&format!(r#"balance: LeastConnections, {THREE}, health: (fall: 3)"#));
    let first = b.pick(CLIENT, &[]).unwrap();
    assert!(
        !first.report_success,
        "a healthy pair's success changes nothing: no need to report it"
    );
    // A connect in flight is load: the next pick goes elsewhere.
    assert_ne!(b.pick(CLIENT, &[]).unwrap().backend, first.backend);
    b.connected(first.backend, refused());
    let snap = &b.snapshot().0[0];
    assert_eq!((snap.active, snap.sessions, snap.connect_failures), (0, 0, 1));
    // One failure in a row: the next success to it would reset that, so it is news.
    let again = (0..3)
        .map(|_| b.pick(CLIENT, &[]).unwrap())
        .find(|p| p.backend == first.backend);
    assert!(again.expect("still usable after one failure").report_success);
}

#[test]
fn picks_before_a_names_first_lookup_wait_for_it() {
    let s = settings(r#"backends: [(addr: "app.test:80")]"#);
    let names: Arc<[Arc<str>]> = s.egress.iter().map(|e| e.name.as_str().into()).collect();
    let (handle, task) = BalancerHandle::spawn(&s.routes[0], names, Arc::default(), 8);
    let waiting = {
        let handle = handle.clone();
        rt::spawn(async move { handle.pick(CLIENT, &[]).await })
    };
    let addr: SocketAddr = "127.0.0.9:80".parse().unwrap();
    // The snapshot is answered while the pick still waits: the actor is not blocked.
    assert!(rt::block_on(handle.snapshot()).unwrap().0.is_empty());
    rt::block_on(handle.resolved(0, vec![addr])).unwrap();
    let picked = rt::block_on(waiting).unwrap().unwrap();
    assert_eq!(picked.addr, addr, "answered with the first addresses");
    drop(handle);
    rt::block_on(futures::future::join_all(task));
}

#[test]
fn a_reload_keeps_what_stays_retires_what_goes_and_adds_what_is_new() {
    let mut b = balancer(&format!(r#"{THREE}, health: (fall: 1, cooldown: "1m")"#));
    let (first, second) = (b.entries[0].id, b.entries[1].id);
    b.connected(second, refused());
    let live = b.pick(CLIENT, &[]).unwrap();
    assert_eq!(live.backend, first, "a session lives on :1");
    // :1 stays (weight 3), :2 stays down, :3 goes, :4 joins; the order of the list changes.
    let new = settings(
        r#"balance: WeightedRoundRobin, health: (fall: 1, cooldown: "1m"),
            backends: [(addr: "127.0.0.1:4"), (addr: "127.0.0.1:2"), (addr: "127.0.0.1:1", weight: 3)]"#,
    );
    b.reconfigure(&new.routes[0], b.egress_names.clone());
    let seen = b.snapshot().0;
    let state = |port: u16| {
        seen.iter()
            .find(|s| s.addr.port() == port)
            .map(|s| (s.state, s.weight, s.active))
    };
    assert_eq!(state(1), Some((HealthState::Up, 3, 1)), "kept with its live session");
    assert_eq!(
        state(2),
        Some((HealthState::Down, 1, 0)),
        "kept out: its cool-down runs on"
    );
    assert_eq!(state(3), None, "gone at once: nothing live on it");
    assert_eq!(state(4), Some((HealthState::Up, 1, 0)));
    // (Its first pick, before the reload, went through the same smooth rotation: it goes on.)
    assert_eq!(ports(&mut b, 4), [1, 4, 1, 1], "weights 3:1, nothing for the down one");
    // A backend removed while a session lives on it retires.
    let mut b = balancer(THREE);
    let live = b.pick(CLIENT, &[]).unwrap();
    let only_two = settings(r#"backends: [(addr: "127.0.0.1:2")]"#);
    b.reconfigure(&only_two.routes[0], b.egress_names.clone());
    let retired = b.snapshot().0.into_iter().find(|s| s.addr == live.addr).unwrap();
    assert_eq!((retired.state, retired.active), (HealthState::Retired, 1));
    b.closed(live.backend);
    assert!(
        b.snapshot().0.iter().all(|s| s.addr.port() == 2),
        "the retired entry went with its session"
    );
    // Listed again: back in, not a second entry.
    b.reconfigure(&new.routes[0], b.egress_names.clone());
    assert_eq!(b.snapshot().0.len(), 3);
}

#[test]
fn a_reload_without_checks_brings_back_what_only_checks_could() {
    let mut b = balancer(&format!(r#"{THREE}, health: (fall: 1, check: (interval: "1s"))"#));
    let second = b.entries[1].id;
    b.checked(second, Err("expected +PONG".into()));
    assert_eq!(b.snapshot().0[1].state, HealthState::Down);
    b.reconfigure(&settings(THREE).routes[0], b.egress_names.clone());
    assert_eq!(b.snapshot().0[1].state, HealthState::Up);
}

#[test]
fn a_backend_out_is_on_trial_once_its_cooldown_ends_and_its_ejections_and_checks_are_counted() {
    let mut b =
        balancer(r#"backends: [(addr: "127.0.0.1:1"), (addr: "127.0.0.1:2")], health: (fall: 1, cooldown: "1ms")"#);
    let first = b.entries[0].id;
    b.connected(first, refused());
    let out = std::time::Instant::now();
    let state = |b: &Balancer| b.snapshot().0[0].state;
    while state(&b) == HealthState::Down {
        assert!(
            out.elapsed() < std::time::Duration::from_secs(5),
            "a 1 ms cool-down ends"
        );
        std::thread::yield_now();
    }
    assert_eq!(state(&b), HealthState::Trial);
    // The trial fails: out again (the second ejection), for longer.
    b.connected(first, refused());
    assert_eq!(b.snapshot().0[0].ejections, 2);
    b.checked(first, Err("refused".into()));
    b.checked(first, Ok(()));
    b.checked(first, Ok(()));
    assert_eq!(b.snapshot().0[0].checks, [2, 1], "passed, failed");
    assert_eq!(state(&b), HealthState::Up, "a passed check (rise 1) brings it back");
    assert_eq!(b.snapshot().0[1].ejections, 0);
}

#[test]
fn round_robin_by_default_honours_weights_and_rotates_plainly_when_they_are_equal() {
    let mut b =
        balancer(r#"backends: [(addr: "127.0.0.1:1", weight: 3), (addr: "127.0.0.1:2"), (addr: "127.0.0.1:3")]"#);
    let picks = ports(&mut b, 30);
    let count = |port: u16| picks.iter().filter(|p| **p == port).count();
    assert_eq!((count(1), count(2), count(3)), (18, 6, 6), "3:1:1 of 30");
    assert!(
        !picks.windows(4).any(|w| w.iter().all(|p| *p == 1)),
        "interleaved, not in bursts: {picks:?}"
    );
    let mut plain = balancer(THREE);
    assert_eq!(ports(&mut plain, 6), [1, 2, 3, 1, 2, 3]);
}

#[test]
fn each_worker_picks_from_its_own_shard_and_a_failure_on_one_takes_the_backend_out_on_all() {
    let s = settings(&format!(r#"{THREE}, health: (fall: 2, cooldown: "1m")"#));
    let names: Arc<[Arc<str>]> = s.egress.iter().map(|e| e.name.as_str().into()).collect();
    let runtime = rt::Runtime::new(std::num::NonZeroUsize::new(2)).unwrap();
    let stats = Arc::<Stats>::default();
    let (handle, shards) = runtime.enter(|| BalancerHandle::spawn(&s.routes[0], names, stats.clone(), 8));
    assert_eq!(shards.len(), 2, "a shard on each worker");
    let on = |worker: usize, n: usize| {
        let handle = handle.clone();
        rt::block_on(runtime.enter(|| {
            rt::spawn_on(worker, async move {
                let mut picks = Vec::new();
                for _ in 0..n {
                    picks.push(handle.pick(CLIENT, &[]).await.unwrap().unwrap());
                }
                picks
            })
        }))
    };
    // Each shard has its own cursor: both start at the first backend.
    let (zero, one) = (on(0, 3), on(1, 3));
    let ports = |picks: &[Pick]| picks.iter().map(|p| p.addr.port()).collect::<Vec<_>>();
    assert_eq!((ports(&zero), ports(&one)), (vec![1, 2, 3], vec![1, 2, 3]));
    let snapshot = rt::block_on(handle.snapshot()).unwrap().0;
    assert_eq!(
        snapshot.iter().map(|b| b.sessions).collect::<Vec<_>>(),
        [2, 2, 2],
        "the shards added up"
    );
    // Worker 1's sessions fail twice on backend 2: every shard takes it out, once.
    let second = one[1];
    for _ in 0..2 {
        let handle = handle.clone();
        let failed = runtime.enter(|| {
            rt::spawn_on(1, async move {
                handle
                    .connected(&second, Err((Fault::Backend, "refused".into())))
                    .await
                    .unwrap();
            })
        });
        rt::block_on(failed);
    }
    let ports_now = [ports(&on(0, 4)), ports(&on(1, 4))];
    for (worker, ports) in ports_now.iter().enumerate() {
        assert!(
            !ports.contains(&2),
            "worker {worker} still offered the ejected backend: {ports:?}"
        );
    }
    let snapshot = rt::block_on(handle.snapshot()).unwrap().0;
    assert_eq!(snapshot[1].state, HealthState::Down);
    assert_eq!(snapshot[1].connect_failures, 2, "counted once, not once a shard");
    assert_eq!(stats.health_changes(), 1, "one shard speaks of the change");
    drop(handle);
    rt::block_on(futures::future::join_all(shards));
}

#[test]
fn an_operator_drains_disables_and_enables_a_backend_and_the_order_outlives_a_reload_that_keeps_it() {
    let mut b = balancer(&format!(r#"{THREE}, health: (check: (interval: "1s"))"#));
    let live = b.pick(CLIENT, &[]).unwrap();
    assert_eq!(live.addr.port(), 1);
    assert_eq!(b.admin_backend("127.0.0.1:1", AdminState::Drain), Ok(vec![live.addr]));
    assert_eq!(ports(&mut b, 4), [2, 3, 2, 3], "no new session on the drained backend");
    let seen = b.snapshot().0;
    assert_eq!(
        (seen[0].admin, seen[0].active),
        (AdminState::Drain, 1),
        "its live session goes on"
    );
    assert_eq!(b.targets().len(), 3, "a drained backend is still checked");
    b.admin_backend("127.0.0.1:2", AdminState::Disabled).unwrap();
    let checked: Vec<u16> = b.targets().iter().map(|t| t.addr.port()).collect();
    assert_eq!(checked, [1, 3], "a disabled backend's checks stop");
    assert_eq!(ports(&mut b, 2), [3, 3]);
    // A reload that keeps :1 and :3 keeps :1's order; :2 leaves the config and its order goes.
    let kept = settings(r#"backends: [(addr: "127.0.0.1:3"), (addr: "127.0.0.1:1")]"#);
    b.reconfigure(&kept.routes[0], b.egress_names.clone());
    assert_eq!(ports(&mut b, 2), [3, 3], "still drained after the reload");
    b.reconfigure(&settings(THREE).routes[0], b.egress_names.clone());
    let admin: Vec<AdminState> = b.snapshot().0.iter().map(|s| s.admin).collect();
    assert_eq!(
        admin,
        [AdminState::Drain, AdminState::Enabled, AdminState::Enabled],
        "back in the config, :2 is enabled"
    );
    assert_eq!(b.admin_backend("127.0.0.1:1", AdminState::Enabled), Ok(vec![live.addr]));
    let mut seen: Vec<u16> = ports(&mut b, 3);
    seen.sort_unstable();
    assert_eq!(seen, [1, 2, 3], "enabled: back to its health");
    // Every backend drained: the pick says why at once.
    for port in 1..=3 {
        b.admin_backend(&format!("127.0.0.1:{port}"), AdminState::Drain)
            .unwrap();
    }
    assert_eq!(b.pick(CLIENT, &[]), Err(NoPick::NoneInService));
    let unknown = b.admin_backend("127.0.0.1:9", AdminState::Drain).unwrap_err();
    assert_eq!(unknown, "route r has no backend 127.0.0.1:9");
}

#[test]
fn an_order_on_a_name_covers_every_address_it_resolves_to_and_an_address_order_overrides_it() {
    let mut b = balancer(r#"backends: [(addr: "db.internal:5432"), (addr: "127.0.0.1:1")]"#);
    assert!(
        b.admin_backend("db.internal:5432", AdminState::Drain).is_ok(),
        "named before it resolves"
    );
    let (x, y) = ("192.0.2.1:5432".parse().unwrap(), "192.0.2.2:5432".parse().unwrap());
    b.resolved(0, vec![x, y]);
    assert_eq!(ports(&mut b, 2), [1, 1], "both addresses of the name drained");
    assert_eq!(b.admin_backend("192.0.2.2:5432", AdminState::Enabled), Ok(vec![y]));
    let mut seen = ports(&mut b, 4);
    seen.sort_unstable();
    assert_eq!(
        seen,
        [1, 1, 5432, 5432],
        "the address's own order holds over its name's"
    );
    assert!(b.pick(CLIENT, &[]).is_ok());
    assert!(
        b.snapshot()
            .0
            .iter()
            .any(|s| s.addr == x && s.admin == AdminState::Drain)
    );
}

#[test]
fn an_egress_drained_by_the_operator_takes_no_new_session_but_is_still_checked() {
    let mut b = balancer(&format!(r#"egress: ["a", "b"], egress_strategy: Failover, {THREE}"#));
    let (a, e_b) = (EgressId(1), EgressId(2));
    assert_eq!(b.pick(CLIENT, &[]).unwrap().egress, a);
    b.admin_egresses(vec![Arc::from("a")].into());
    assert_eq!(
        b.pick(CLIENT, &[]).unwrap().egress,
        e_b,
        "new sessions leave by the other"
    );
    assert!(b.snapshot().1[0].drained && b.snapshot().1[0].up);
    assert!(b.targets().iter().all(|t| t.egress == a), "checks still go by it");
    b.admin_egresses(vec![Arc::from("a"), Arc::from("b")].into());
    let why = b.pick(CLIENT, &[]).unwrap_err();
    assert_eq!(why.to_string(), "egress a down: drained by the admin");
    b.admin_egresses(Vec::new().into());
    assert_eq!(b.pick(CLIENT, &[]).unwrap().egress, a);
}
