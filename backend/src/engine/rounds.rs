//! A round's state machine, as pure functions over its state (no database): what the driver
//! does next for a run, and where each step leads.
//!
//! ```text
//! (no round) ──open──▶ collecting ──enough updates──▶ aggregating ──new version evaluated──▶ evaluated ──▶ closed ──open next──▶ collecting …
//!                          └──too few updates──▶ failed (the run fails with the round's reason)
//! ```

use consilium_core::plan::{Plan, TargetMetric};
use consilium_core::protocol::Metrics;
use std::fmt;

/// Where a round is; stored as its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoundState {
    /// Jobs sent; waiting for the sites' updates until the deadline.
    Collecting,
    /// Enough updates: the new model is being built and evaluated at the sites.
    Aggregating,
    /// The new version is evaluated; the stopping rules are to be applied.
    Evaluated,
    /// Done; the next round may open.
    Closed,
    /// Too few sites sent an update (the reason is stored with the round).
    Failed,
}

impl RoundState {
    pub fn as_str(self) -> &'static str {
        match self {
            RoundState::Collecting => "collecting",
            RoundState::Aggregating => "aggregating",
            RoundState::Evaluated => "evaluated",
            RoundState::Closed => "closed",
            RoundState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "collecting" => RoundState::Collecting,
            "aggregating" => RoundState::Aggregating,
            "evaluated" => RoundState::Evaluated,
            "closed" => RoundState::Closed,
            "failed" => RoundState::Failed,
            _ => return None,
        })
    }
}

impl fmt::Display for RoundState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the driver does next for a running run, given its latest round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Open round `n` (from the closed round's model, or the plan's initial one for round 1).
    Open(i32),
    /// Wait for the updates of round `n`.
    Collect(i32),
    /// Aggregate round `n` and have the sites evaluate the result.
    Aggregate(i32),
    /// Apply the stopping rules to round `n` and close it.
    Close(i32),
    /// The round failed: the run fails with its reason.
    Fail(i32),
}

/// The next step after the latest round (`None`: the run has no round yet).
pub fn step(latest: Option<(i32, RoundState)>) -> Step {
    match latest {
        None => Step::Open(1),
        Some((n, RoundState::Collecting)) => Step::Collect(n),
        Some((n, RoundState::Aggregating)) => Step::Aggregate(n),
        Some((n, RoundState::Evaluated)) => Step::Close(n),
        Some((n, RoundState::Closed)) => Step::Open(n + 1),
        Some((n, RoundState::Failed)) => Step::Fail(n),
    }
}

/// Where a collecting round goes once its updates are in (or its deadline passed).
pub fn after_collecting(trained: u32, quorum: u32) -> RoundState {
    if trained >= quorum {
        RoundState::Aggregating
    } else {
        RoundState::Failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in [
            RoundState::Collecting,
            RoundState::Aggregating,
            RoundState::Evaluated,
            RoundState::Closed,
            RoundState::Failed,
        ] {
            assert_eq!(RoundState::parse(s.as_str()), Some(s));
        }
        assert_eq!(RoundState::parse("paused"), None);
    }

    #[test]
    fn a_run_moves_through_its_rounds() {
        assert_eq!(step(None), Step::Open(1));
        assert_eq!(step(Some((1, RoundState::Collecting))), Step::Collect(1));
        assert_eq!(step(Some((1, RoundState::Aggregating))), Step::Aggregate(1));
        assert_eq!(step(Some((1, RoundState::Evaluated))), Step::Close(1));
        assert_eq!(step(Some((1, RoundState::Closed))), Step::Open(2));
        assert_eq!(step(Some((3, RoundState::Failed))), Step::Fail(3));
    }

    #[test]
    fn a_round_needs_its_quorum() {
        assert_eq!(after_collecting(2, 2), RoundState::Aggregating);
        assert_eq!(after_collecting(3, 2), RoundState::Aggregating);
        assert_eq!(after_collecting(1, 2), RoundState::Failed);
        assert_eq!(after_collecting(0, 1), RoundState::Failed);
    }
}

/// The plan's stopping metric of a round's global model, larger being better throughout.
pub fn metric(m: &Metrics, name: TargetMetric) -> f64 {
    match name {
        TargetMetric::Loss => -m.loss,
        TargetMetric::Auroc => m.auroc.unwrap_or(0.0),
        TargetMetric::Accuracy => m.accuracy,
        TargetMetric::Dice => m
            .segmentation
            .as_ref()
            .and_then(|s| s.mean_dice)
            .unwrap_or(0.0),
    }
}

/// Whether the run stops after `round`, and why: the maximum number of rounds, the target
/// metric reached, or no improvement for `patience` rounds.
pub fn stopping(plan: &Plan, round: i32, values: &[f64]) -> Option<String> {
    if round as u32 >= plan.rounds {
        return Some(format!("Completed the plan's {} rounds.", plan.rounds));
    }
    let name = plan.stopping.metric.name();
    if let (Some(target), Some(last)) = (plan.stopping.target, values.last()) {
        let reached = if plan.stopping.metric == TargetMetric::Loss {
            -last <= target
        } else {
            *last >= target
        };
        if reached {
            return Some(format!(
                "Reached the target {name} {target} in round {round}."
            ));
        }
    }
    if let Some(k) = plan.stopping.patience {
        let k = k as usize;
        if values.len() > k {
            let best_before = values[..values.len() - k]
                .iter()
                .copied()
                .fold(f64::NEG_INFINITY, f64::max);
            if values[values.len() - k..].iter().all(|v| *v <= best_before) {
                return Some(format!("No improvement of {name} for {k} rounds."));
            }
        }
    }
    None
}

#[cfg(test)]
mod stopping_tests {
    use super::*;
    use consilium_core::manifest::TrainingPlanManifest;

    fn plan(stopping: serde_json::Value) -> Plan {
        let m: TrainingPlanManifest = serde_json::from_value(serde_json::json!({
            "model": {"architecture": "small_cnn", "num_classes": 2},
            "optimiser": {"name": "sgd", "learning_rate": 0.05},
            "local_epochs": 1, "batch_size": 8, "rounds": 10,
            "aggregation": {"strategy": "fedavg"},
            "stopping": stopping
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        m.parse().unwrap_or_else(|p| panic!("{p:?}"))
    }

    fn global(accuracy: f64, auroc: f64, loss: f64) -> Metrics {
        Metrics {
            loss,
            accuracy,
            auroc: Some(auroc),
            samples: 10,
            segmentation: None,
        }
    }

    /// The same rounds stop the run, or not, by the metric the plan names.
    #[test]
    fn the_target_metric_decides_when_a_run_stops() {
        let rounds = [global(0.80, 0.91, 0.40), global(0.86, 0.93, 0.35)];
        let decide = |stopping: serde_json::Value| {
            let p = plan(stopping);
            let values: Vec<f64> = rounds
                .iter()
                .map(|m| metric(m, p.stopping.metric))
                .collect();
            stopping_reason(&p, &values)
        };
        assert_eq!(
            decide(serde_json::json!({"target_metric": "accuracy", "target_value": 0.9})),
            None
        );
        assert_eq!(
            decide(serde_json::json!({"target_metric": "auroc", "target_value": 0.9})),
            Some("Reached the target auroc 0.9 in round 2.".to_string())
        );
        assert_eq!(
            decide(serde_json::json!({"target_metric": "loss", "target_value": 0.3})),
            None
        );
        assert_eq!(
            decide(serde_json::json!({"target_metric": "loss", "target_value": 0.36})),
            Some("Reached the target loss 0.36 in round 2.".to_string())
        );
        // Patience watches the plan's metric too: accuracy fell, AUROC did not.
        let worse = [global(0.86, 0.90, 0.3), global(0.84, 0.95, 0.3)];
        let patient = |metric_name: &str| {
            let mut s = serde_json::json!({"patience": 1});
            if metric_name != "accuracy" {
                s = serde_json::json!({"patience": 1, "target_metric": metric_name, "target_value": 0.99});
            }
            let p = plan(s);
            let values: Vec<f64> = worse.iter().map(|m| metric(m, p.stopping.metric)).collect();
            stopping_reason(&p, &values)
        };
        assert_eq!(
            patient("accuracy"),
            Some("No improvement of accuracy for 1 rounds.".to_string())
        );
        assert_eq!(patient("auroc"), None);
    }

    /// A segmentation plan stops on the global model's mean Dice (its default metric).
    #[test]
    fn a_segmentation_run_stops_on_dice() {
        let m: TrainingPlanManifest = serde_json::from_value(serde_json::json!({
            "model": {"architecture": "unet", "num_classes": 2, "labels": {"0": "background", "1": "lesion"}},
            "optimiser": {"name": "adamw", "learning_rate": 0.01},
            "local_epochs": 1, "batch_size": 8, "rounds": 10,
            "aggregation": {"strategy": "fedavg"},
            "stopping": {"target_metric": "dice", "target_value": 0.8}
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        let p = m.parse().unwrap_or_else(|p| panic!("{p:?}"));
        let scored = |dice: Option<f64>| Metrics {
            // A high pixel accuracy (mostly background) does not stop it.
            accuracy: 0.99,
            segmentation: Some(consilium_core::segmentation::SegmentationScores {
                dice: vec![dice],
                mean_dice: dice,
                mean_iou: None,
                hd95: None,
            }),
            ..global(0.99, 0.0, 0.1)
        };
        let values: Vec<f64> = [scored(None), scored(Some(0.6)), scored(Some(0.82))]
            .iter()
            .map(|m| metric(m, p.stopping.metric))
            .collect();
        assert_eq!(values[0], 0.0, "no Dice yet counts as none");
        assert_eq!(stopping_reason(&p, &values[..2]), None);
        assert_eq!(
            stopping_reason(&p, &values),
            Some("Reached the target dice 0.8 in round 3.".to_string())
        );
    }

    fn stopping_reason(p: &Plan, values: &[f64]) -> Option<String> {
        stopping(p, values.len() as i32, values)
    }
}
