//! The one rule of per-model quotas, held together: over random pools (keys in groups, with learned
//! projects, in error, retired, locked down whole or not; lockdowns of a group, a project or a key
//! alone, of one model or every model, in force or expired), the Rust rule (`pool::rule`), the store's
//! availability count, a zero-wait claim and `apijongler why --json` give the same answer for every
//! (key, model): can a request for that model take that key now?

mod common;

use std::time::Duration;

use api_jongler::pool::{KeyRecord, rule};
use api_jongler::{Coordinator, Error};
use common::Sandbox;

const CONNECTOR: &str = "c";
const KEYS: usize = 4;
const MODELS: [Option<&str>; 3] = [None, Some("m1"), Some("m2")];
/// Deadlines an hour from now either way: far from any boundary however slow the machine.
const HOUR: i64 = 3_600_000;

/// A small deterministic generator (xorshift), so every run checks the same pools.
struct Random(u64);

impl Random {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[usize::try_from(self.below(items.len() as u64)).expect("small")]
    }
}

/// A random pool in a new sandbox, and the coordinator on it.
fn random_pool(seed: u64) -> (Sandbox, Coordinator) {
    let mut random = Random(0x9E37_79B9_7F4A_7C15 ^ (seed + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
    let mut ini = format!("[{CONNECTOR}]\n");
    for index in 0..KEYS {
        ini.push_str(&format!("key{index} = fake-secret-{index}-do-not-use\n"));
    }
    ini.push_str(&format!("[{CONNECTOR} groups]\n"));
    for index in 0..KEYS {
        if let Some(group) = random.pick(&[None, Some("g1"), Some("g2")]) {
            ini.push_str(&format!("key{index} = {group}\n"));
        }
    }
    let sandbox = Sandbox::with_keyring(&ini);
    let coordinator = sandbox.coordinator(sandbox.options());
    let now = coordinator.now_ms();
    let sql = sandbox.sql();
    for index in 0..KEYS {
        let name = format!("key{index}");
        if random.below(3) == 0 {
            sql.execute("UPDATE keys SET project_learned = 'p1' WHERE key_name = ?1", &[&name]).expect("project");
        }
        match random.below(6) {
            0 => sql.execute("UPDATE keys SET state = 'error', reason = 'bad' WHERE key_name = ?1", &[&name]),
            1 => sql.execute("UPDATE keys SET retired_at = ?2 WHERE key_name = ?1", &[&name, &now]),
            2 => sql.execute(
                "UPDATE keys SET state = 'lockdown', lockdown_until = ?2 WHERE key_name = ?1",
                &[&name, &(now + *random.pick(&[-HOUR, HOUR]))],
            ),
            _ => Ok(0),
        }
        .expect("key state");
    }
    for _ in 0..random.below(5) {
        let scope =
            random.pick(&["group:g1", "group:g2", "project:p1", "key:key0", "key:key1", "key:key2", "key:key3"]);
        let model = random.pick(&["*", "m1", "m2"]);
        let until = now + *random.pick(&[-HOUR, HOUR]);
        sql.execute(
            "INSERT INTO lockdowns (connector, scope, model, until, reason, set_by_key, set_at)
             VALUES (?1, ?2, ?3, ?4, 'random', 'key0', ?5)
             ON CONFLICT (connector, scope, model) DO UPDATE SET until = excluded.until",
            &[&CONNECTOR, scope, model, &until, &now],
        )
        .expect("lockdown");
    }
    (sandbox, coordinator)
}

/// The four answers for one key and model, in the order: rule, availability, claim, why.
fn answers(sandbox: &Sandbox, coordinator: &Coordinator, key: &str, model: Option<&str>) -> [bool; 4] {
    let store = coordinator.store();
    let now = coordinator.now_ms();
    let keys = store.keys(Some(CONNECTOR)).expect("keys");
    let lockdowns = store.lockdowns(Some(CONNECTOR)).expect("lockdowns");
    let record = keys.iter().find(|record| record.key_name == key).expect("the key's row");
    let by_rule = rule::claimable(record, &lockdowns, model, now);

    let others: Vec<String> = (0..KEYS).map(|index| format!("key{index}")).filter(|name| name != key).collect();
    let by_count = store.availability(CONNECTOR, model, &others, now).expect("availability").claimable == 1;

    let by_claim = match coordinator.claim_for(CONNECTOR, model, &others, Duration::ZERO) {
        Ok(lease) => {
            assert_eq!(lease.key_name(), key, "the claim took a key it was told to skip");
            lease.release().expect("release");
            true
        }
        Err(Error::NoKeyAvailable(_)) => false,
        Err(error) => panic!("claim: {error}"),
    };

    let mut why = sandbox.apijongler();
    why.args(["--json", "why", CONNECTOR, key]);
    if let Some(model) = model {
        why.args(["--model", model]);
    }
    let output = why.output().expect("run why");
    assert!(output.status.success(), "why: {}", String::from_utf8_lossy(&output.stderr));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("why --json");
    let by_why = json["claimable_now"].as_bool().expect("claimable_now");
    [by_rule, by_count, by_claim, by_why]
}

#[test]
fn the_rule_the_count_the_claim_and_why_agree_on_every_key_and_model() {
    let mut checked = [0usize; 2];
    for seed in 0..16 {
        let (sandbox, coordinator) = random_pool(seed);
        for index in 0..KEYS {
            let key = format!("key{index}");
            for model in MODELS {
                let [by_rule, by_count, by_claim, by_why] = answers(&sandbox, &coordinator, &key, model);
                assert!(
                    by_rule == by_count && by_rule == by_claim && by_rule == by_why,
                    "seed {seed}, {key}, model {model:?}: rule {by_rule}, availability {by_count}, claim {by_claim}, \
                     why {by_why}\nkeys: {:#?}\nlockdowns: {:#?}",
                    coordinator.store().keys(None).expect("keys"),
                    coordinator.store().lockdowns(None).expect("lockdowns"),
                );
                checked[usize::from(by_rule)] += 1;
            }
        }
    }
    // Both answers occur often enough for the comparison to mean something.
    assert!(checked[0] >= 20 && checked[1] >= 20, "claimable / not: {checked:?}");
}

#[test]
fn the_counts_and_the_earliest_end_of_availability_follow_the_rule() {
    let mut kept = 0;
    for seed in 0..16 {
        let (_sandbox, coordinator) = random_pool(seed);
        let store = coordinator.store();
        let now = coordinator.now_ms();
        let keys = store.keys(Some(CONNECTOR)).expect("keys");
        let lockdowns = store.lockdowns(Some(CONNECTOR)).expect("lockdowns");
        for model in MODELS {
            let availability = store.availability(CONNECTOR, model, &[], now).expect("availability");
            // A key kept from every request (model None) is in a lockdown of every model; one kept only
            // from this model's requests is in a lockdown of the model.
            let free_at = |key: &KeyRecord, model: Option<&str>| rule::free_at(key, &lockdowns, model, now);
            let count = |kept: &dyn Fn(&KeyRecord) -> bool| {
                u32::try_from(keys.iter().filter(|key| kept(key)).count()).expect("few keys")
            };
            let expected = (
                count(&|key| rule::claimable(key, &lockdowns, model, now)),
                count(&|key| free_at(key, None).is_some()),
                count(&|key| free_at(key, None).is_none() && free_at(key, model).is_some()),
                keys.iter().filter_map(|key| free_at(key, model)).min(),
            );
            let counted = (
                availability.claimable,
                availability.lockdown,
                availability.model_lockdown,
                availability.earliest_lockdown_end,
            );
            assert_eq!(
                counted, expected,
                "seed {seed}, model {model:?}: availability (claimable, lockdown, model lockdown, earliest end) \
                 against the rule\nkeys: {keys:#?}\nlockdowns: {lockdowns:#?}"
            );
            kept += usize::from(expected.3.is_some());
        }
    }
    // Pools with keys kept by lockdowns occur often enough for the comparison to mean something.
    assert!(kept >= 10, "pools with a lockdown in force: {kept}");
}
