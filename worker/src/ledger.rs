//! The site's own privacy ledger: what DP-SGD training has spent of its dataset's privacy, kept
//! at the site. The site is the trust anchor for its data: before any round trains, the worker
//! adds the round's Rényi cost to what the run and the dataset have already spent and refuses
//! the job, whatever the server asks, when the run's approved ε or the dataset's lifetime ε
//! would be exceeded. A cost is recorded before training starts and never released: a round
//! that fails after it began may have spent nothing, and counting it anyway errs on the side of
//! the patients.
//!
//! The ledger is a JSON file written whole to a temporary file, flushed and renamed into place,
//! so a crash leaves the old or the new ledger, never half of one. An unreadable ledger stops
//! the worker: starting again from zero would forget what was spent.

use chrono::{DateTime, Utc};
use consilium_core::privacy::{RdpCost, default_orders};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use uuid::Uuid;

/// The dataset's lifetime budget, set by the site (worker configuration `[privacy_budget]`).
#[derive(Clone, Copy, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// ε per patient over every run this dataset ever takes part in.
    pub epsilon: f64,
    /// δ the lifetime ε is stated at.
    pub delta: f64,
}

impl Budget {
    /// Why this budget cannot be used, if it cannot.
    pub fn check(&self) -> Result<(), String> {
        if !(self.epsilon.is_finite() && self.epsilon > 0.0) {
            return Err(format!(
                "privacy_budget.epsilon must be a positive number, not {}",
                self.epsilon
            ));
        }
        if !(self.delta > 0.0 && self.delta <= consilium_core::plan::MAX_DELTA) {
            return Err(format!(
                "privacy_budget.delta must be above 0 and at most {}, not {}",
                consilium_core::plan::MAX_DELTA,
                self.delta
            ));
        }
        Ok(())
    }
}

/// One round's spending.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub job_id: Uuid,
    pub run_id: Uuid,
    pub study_id: Uuid,
    pub round: u32,
    pub at: DateTime<Utc>,
    pub patients: u64,
    pub sampling_rate: f64,
    pub noise_multiplier: f64,
    pub steps: u64,
    pub rdp: RdpCost,
    /// A private preview's generator (`run_id` names the preview request), not a round.
    #[serde(default)]
    pub preview: bool,
}

impl Entry {
    /// What was trained, in words.
    fn what(&self) -> String {
        if self.preview {
            "this preview's generator".into()
        } else {
            format!("round {}", self.round)
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct LedgerFile {
    entries: Vec<Entry>,
}

/// What a round may spend, and what it then has spent.
pub struct Spending {
    /// The run's approved budget (the plan's ε at its δ).
    pub run_epsilon: f64,
    pub run_delta: f64,
}

/// After a round's cost was recorded: ε of the round, of the run and of the dataset.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spent {
    pub epsilon_round: f64,
    pub epsilon_run: f64,
    pub epsilon_dataset: f64,
}

pub struct Ledger {
    path: Option<PathBuf>,
    budget: Option<Budget>,
    state: Mutex<LedgerFile>,
}

/// Float slack for budgets met exactly (σ derived to spend the whole budget).
const SLACK: f64 = 1e-9;

impl Ledger {
    /// A ledger that lives as long as the process (embedded sites, tests).
    pub fn in_memory(budget: Option<Budget>) -> Self {
        Ledger {
            path: None,
            budget,
            state: Mutex::default(),
        }
    }

    /// The ledger in `path` (created empty when the file does not exist yet).
    pub fn open(path: &Path, budget: Option<Budget>) -> Result<Self, String> {
        if let Some(b) = &budget {
            b.check()?;
        }
        let state = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                format!(
                    "the privacy ledger {} is unreadable ({e}); restore it from a backup: starting from an empty ledger would forget what this dataset has spent",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => LedgerFile::default(),
            Err(e) => {
                return Err(format!(
                    "cannot read the privacy ledger {}: {e}",
                    path.display()
                ));
            }
        };
        Ok(Ledger {
            path: Some(path.to_path_buf()),
            budget,
            state: Mutex::new(state),
        })
    }

    pub fn budget(&self) -> Option<Budget> {
        self.budget
    }

    /// Every round recorded, oldest first.
    pub fn entries(&self) -> Vec<Entry> {
        self.state
            .lock()
            .map(|s| s.entries.clone())
            .unwrap_or_default()
    }

    /// What was spent, per run and in all, in words (`consilium-worker privacy`).
    pub fn report(&self) -> Result<String, String> {
        let entries = self.entries();
        let orders = default_orders();
        let err = |e: consilium_core::privacy::PrivacyError| e.to_string();
        let delta = self.budget.map_or(1e-5, |b| b.delta);
        let mut runs: std::collections::BTreeMap<Uuid, (Uuid, bool, u32, RdpCost)> =
            Default::default();
        let mut all = RdpCost::zero(&orders);
        for e in &entries {
            let run = runs
                .entry(e.run_id)
                .or_insert_with(|| (e.study_id, e.preview, 0, RdpCost::zero(&orders)));
            run.2 += 1;
            run.3 = run.3.plus(&e.rdp).map_err(err)?;
            all = all.plus(&e.rdp).map_err(err)?;
        }
        let previews = runs.values().filter(|r| r.1).count();
        let mut out = format!(
            "{} private rounds in {} runs, {previews} private previews\n",
            entries.iter().filter(|e| !e.preview).count(),
            runs.len() - previews
        );
        for (run, (study, preview, rounds, cost)) in &runs {
            let eps = cost.epsilon(delta).map_err(err)?.epsilon;
            out.push_str(&match preview {
                true => format!("  preview {run} (study {study}): ε = {eps:.3} at δ = {delta}\n"),
                false => format!(
                    "  run {run} (study {study}): {rounds} rounds, ε = {eps:.3} at δ = {delta}\n"
                ),
            });
        }
        let total = if entries.is_empty() {
            0.0
        } else {
            all.epsilon(delta).map_err(err)?.epsilon
        };
        out.push_str(&match self.budget {
            Some(b) => format!(
                "dataset: ε = {total:.3} of the lifetime budget ε = {} at δ = {}\n",
                b.epsilon, b.delta
            ),
            None => format!(
                "dataset: ε = {total:.3} at δ = {delta}; no lifetime budget is set (privacy_budget)\n"
            ),
        });
        Ok(out)
    }

    /// Records `entry` if the run and the dataset can afford it; otherwise says why not and
    /// records nothing.
    pub fn spend(&self, entry: Entry, limits: &Spending) -> Result<Spent, String> {
        let mut state = self
            .state
            .lock()
            .map_err(|_| "the privacy ledger is unusable after an earlier failure".to_string())?;
        let orders = default_orders();
        let err = |e: consilium_core::privacy::PrivacyError| e.to_string();
        let mut run = entry.rdp.clone();
        let mut all = entry.rdp.clone();
        for e in &state.entries {
            if e.rdp.orders != orders {
                return Err(format!(
                    "the privacy ledger holds a cost over other Rényi orders (round {} of run {}); it cannot be added up",
                    e.round, e.run_id
                ));
            }
            if e.run_id == entry.run_id {
                run = run.plus(&e.rdp).map_err(err)?;
            }
            all = all.plus(&e.rdp).map_err(err)?;
        }
        let epsilon_round = entry.rdp.epsilon(limits.run_delta).map_err(err)?.epsilon;
        let epsilon_run = run.epsilon(limits.run_delta).map_err(err)?.epsilon;
        if epsilon_run > limits.run_epsilon * (1.0 + SLACK) {
            return Err(format!(
                "{} would bring this run's privacy spending at this site to ε = {:.3} (δ = {}), above the approved ε = {}; the site does not train it",
                entry.what(),
                epsilon_run,
                limits.run_delta,
                limits.run_epsilon
            ));
        }
        let delta = self.budget.map_or(limits.run_delta, |b| b.delta);
        let epsilon_dataset = all.epsilon(delta).map_err(err)?.epsilon;
        if let Some(b) = self.budget
            && epsilon_dataset > b.epsilon * (1.0 + SLACK)
        {
            return Err(format!(
                "{} would bring this dataset's lifetime privacy spending to ε = {:.3} (δ = {}), above the site's budget of ε = {}; the site does not train it (the site's IT can see what was spent in its privacy ledger)",
                entry.what(),
                epsilon_dataset,
                b.delta,
                b.epsilon
            ));
        }
        state.entries.push(entry);
        if let Some(path) = &self.path
            && let Err(e) = write(path, &state)
        {
            state.entries.pop();
            return Err(e);
        }
        Ok(Spent {
            epsilon_round,
            epsilon_run,
            epsilon_dataset,
        })
    }
}

fn write(path: &Path, state: &LedgerFile) -> Result<(), String> {
    use std::io::Write;
    let fail = |e: std::io::Error| {
        format!(
            "cannot write the privacy ledger {}: {e}; the round is not trained",
            path.display()
        )
    };
    let bytes = serde_json::to_vec_pretty(state).map_err(|e| e.to_string())?;
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(fail)?;
    f.write_all(&bytes).map_err(fail)?;
    f.sync_all().map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(run: Uuid, round: u32, sigma: f64) -> Entry {
        Entry {
            job_id: Uuid::new_v4(),
            run_id: run,
            study_id: Uuid::nil(),
            round,
            at: Utc::now(),
            patients: 100,
            sampling_rate: 0.1,
            noise_multiplier: sigma,
            steps: 50,
            rdp: RdpCost::sampled_gaussian(0.1, sigma, 50, &default_orders()).expect("cost"),
            preview: false,
        }
    }

    #[test]
    fn refuses_the_round_that_would_overspend_and_keeps_what_was_spent() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("ledger.json");
        let limits = Spending {
            run_epsilon: 100.0,
            run_delta: 1e-5,
        };
        let rounds = |n: usize| {
            let one = entry(Uuid::nil(), 1, 1.0).rdp;
            let mut c = RdpCost::zero(&default_orders());
            for _ in 0..n {
                c = c.plus(&one).expect("same orders");
            }
            c.epsilon(1e-5).expect("eps").epsilon
        };
        // A lifetime budget that affords two such rounds but not three.
        let budget = Budget {
            epsilon: (rounds(2) + rounds(3)) / 2.0,
            delta: 1e-5,
        };
        let ledger = Ledger::open(&path, Some(budget)).expect("ledger");
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        ledger
            .spend(entry(a, 1, 1.0), &limits)
            .expect("first round");
        let spent = ledger
            .spend(entry(b, 1, 1.0), &limits)
            .expect("another run");
        assert!(spent.epsilon_dataset > spent.epsilon_run);
        let err = ledger
            .spend(entry(a, 2, 1.0), &limits)
            .expect_err("third round over budget");
        assert!(err.contains("lifetime privacy spending"), "{err}");
        // What was spent survives a restart; the refused round was not recorded.
        let again = Ledger::open(&path, Some(budget)).expect("reopened");
        assert_eq!(again.entries().len(), 2);
        assert!(again.spend(entry(a, 2, 1.0), &limits).is_err());
    }

    #[test]
    fn refuses_a_round_above_the_runs_approved_budget() {
        let ledger = Ledger::in_memory(None);
        let run = Uuid::new_v4();
        let one = entry(run, 1, 1.0).rdp.epsilon(1e-5).expect("eps").epsilon;
        let limits = Spending {
            run_epsilon: one * 1.2,
            run_delta: 1e-5,
        };
        let spent = ledger.spend(entry(run, 1, 1.0), &limits).expect("round 1");
        assert!((spent.epsilon_run - one).abs() < 1e-12);
        let err = ledger
            .spend(entry(run, 2, 1.0), &limits)
            .expect_err("round 2");
        assert!(
            err.contains("round 2 would bring this run") && err.contains("above the approved ε"),
            "{err}"
        );
        // Another run has its own approved budget.
        assert!(ledger.spend(entry(Uuid::new_v4(), 1, 1.0), &limits).is_ok());
    }

    #[test]
    fn an_unreadable_ledger_is_not_started_over() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("ledger.json");
        std::fs::write(&path, b"{not json").expect("write");
        let err = Ledger::open(&path, None).err().expect("refused");
        assert!(err.contains("restore it from a backup"), "{err}");
    }
}
