//! Learning-rate schedules: linear warm-up, then a decay to a floor (Megatron's
//! `--lr-decay-style`, torchtitan's `lr_scheduler`).
//!
//! For the 0-based step `s` of a run of `T` steps with `W` warm-up steps, peak `η` and floor
//! ratio `m` (the final learning rate is `m·η`, Megatron's `--min-lr` / `--lr`):
//! - warm-up, `s < W`: `η · (s + 1) / W` (a warm-up longer than the run is allowed);
//! - after it, with `p = (s − W) / (T − W)` and a shape `f(p)` falling from 1 to 0:
//!   `η · (m + (1 − m) · f)`, where `f` is
//!   - [`Constant`](DecayStyle::Constant): 1 (no decay),
//!   - [`Linear`](DecayStyle::Linear): `1 − p`,
//!   - [`Cosine`](DecayStyle::Cosine): `(1 + cos πp) / 2`,
//!
//!   Megatron's convention: step `W` runs at the peak, and `p` reaches 1 at step `T`, one past
//!   the last step (which runs at `f(1 − 1/(T − W))`, just above the floor);
//!   - [`Wsd`](DecayStyle::Wsd) (warm-up, stable, decay; torchtitan's): 1 until the last `D`
//!     steps ([`LrScheduleConfig::decay_steps`], default a tenth of `T − W`), then linear to 0
//!     over them: the first of them already below the peak, the last step at the floor.
//!
//! ```
//! use burn_parallel::optim::schedule::{DecayStyle, LrScheduleConfig};
//! let s = LrScheduleConfig::new(6e-4, 1000).with_warmup_steps(100).with_decay(DecayStyle::Wsd).init().unwrap();
//! let near = |a: f64, b: f64| (a - b).abs() < 1e-12;
//! assert!(near(s.lr(0), 6e-6)); // warm-up
//! assert!(near(s.lr(500), 6e-4)); // stable
//! assert!(near(s.lr(999), 6e-5)); // the floor, a tenth of the peak, at the end
//! ```

use burn::config::Config;

/// How the learning rate falls after the warm-up (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DecayStyle {
    /// No decay.
    Constant,
    /// Linear toward the floor (reached one step past the run, as Megatron's).
    Linear,
    /// Half a cosine toward the floor (reached one step past the run, as Megatron's).
    Cosine,
    /// Warm-up, stable at the peak, then linear to the floor over the last `decay_steps` (the
    /// last step at the floor).
    Wsd,
}

impl std::str::FromStr for DecayStyle {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "constant" => Ok(Self::Constant),
            "linear" => Ok(Self::Linear),
            "cosine" => Ok(Self::Cosine),
            "wsd" => Ok(Self::Wsd),
            other => Err(format!("unknown decay style {other:?} (constant, linear, cosine or wsd)")),
        }
    }
}

impl std::fmt::Display for DecayStyle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Constant => "constant",
            Self::Linear => "linear",
            Self::Cosine => "cosine",
            Self::Wsd => "wsd",
        })
    }
}

/// A schedule that cannot be: the numbers that disagree.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScheduleError {
    /// A floor outside `[0, 1]` of the peak.
    #[error("the final learning rate must be 0 to 1 times the peak, got {0}")]
    BadFloor(f64),
    /// A peak that is negative or not finite.
    #[error("the peak learning rate must be finite and at least 0, got {0}")]
    BadPeak(f64),
    /// WSD with no decay step.
    #[error("a WSD schedule needs at least 1 decay step")]
    NoDecaySteps,
    /// WSD's decay does not fit after the warm-up.
    #[error("{decay} decay steps do not fit the {after} steps after the warm-up")]
    DecayTooLong {
        /// Decay steps.
        decay: usize,
        /// Steps after the warm-up.
        after: usize,
    },
}

/// The schedule's numbers (module docs).
#[derive(Config, Debug)]
pub struct LrScheduleConfig {
    /// Peak learning rate.
    pub peak: f64,
    /// Steps of the run.
    pub total_steps: usize,
    /// Linear warm-up steps.
    #[config(default = 0)]
    pub warmup_steps: usize,
    /// The decay after the warm-up.
    #[config(default = "DecayStyle::Cosine")]
    pub decay: DecayStyle,
    /// The final learning rate as a fraction of the peak.
    #[config(default = 0.1)]
    pub min_ratio: f64,
    /// WSD: steps of the final decay (default: a tenth of the steps after the warm-up, at least
    /// 1); the other styles ignore it.
    #[config(default = "None")]
    pub decay_steps: Option<usize>,
}

/// A checked schedule: [`lr`](Self::lr) of any step.
#[derive(Debug, Clone)]
pub struct LrSchedule {
    config: LrScheduleConfig,
    decay_steps: usize,
}

impl LrScheduleConfig {
    /// Checks the numbers.
    pub fn init(&self) -> Result<LrSchedule, ScheduleError> {
        if !self.peak.is_finite() || self.peak < 0.0 {
            return Err(ScheduleError::BadPeak(self.peak));
        }
        if !(0.0..=1.0).contains(&self.min_ratio) {
            return Err(ScheduleError::BadFloor(self.min_ratio));
        }
        // A warm-up longer than the run is allowed: the run ends in it.
        let after = self.total_steps.saturating_sub(self.warmup_steps);
        let decay_steps = self.decay_steps.unwrap_or((after / 10).max(1));
        if self.decay == DecayStyle::Wsd && decay_steps == 0 {
            return Err(ScheduleError::NoDecaySteps);
        }
        if self.decay == DecayStyle::Wsd && decay_steps > after.max(1) {
            return Err(ScheduleError::DecayTooLong { decay: decay_steps, after });
        }
        Ok(LrSchedule { config: self.clone(), decay_steps })
    }
}

impl LrSchedule {
    /// The learning rate of the 0-based step `step` (steps past the run continue the shape,
    /// clamped at the floor).
    pub fn lr(&self, step: usize) -> f64 {
        let c = &self.config;
        if step < c.warmup_steps {
            return c.peak * (step + 1) as f64 / c.warmup_steps as f64;
        }
        let after = c.total_steps.saturating_sub(c.warmup_steps).max(1);
        let p = ((step - c.warmup_steps) as f64 / after as f64).min(1.0);
        let f = match c.decay {
            DecayStyle::Constant => return c.peak,
            DecayStyle::Linear => 1.0 - p,
            DecayStyle::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
            DecayStyle::Wsd => {
                let start = c.total_steps.saturating_sub(self.decay_steps).max(c.warmup_steps);
                match step.checked_sub(start) {
                    None => 1.0,
                    // The first decay step is below the peak, the last one is the floor.
                    Some(k) => 1.0 - ((k + 1) as f64 / self.decay_steps as f64).min(1.0),
                }
            }
        };
        c.peak * (c.min_ratio + (1.0 - c.min_ratio) * f)
    }

    /// The configuration.
    pub fn config(&self) -> &LrScheduleConfig {
        &self.config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(decay: DecayStyle) -> LrSchedule {
        LrScheduleConfig::new(1.0, 110).with_warmup_steps(10).with_decay(decay).init().unwrap()
    }

    #[test]
    fn every_style_warms_up_linearly_then_decays_to_the_floor() {
        for d in [DecayStyle::Constant, DecayStyle::Linear, DecayStyle::Cosine, DecayStyle::Wsd] {
            let s = schedule(d);
            assert_eq!((s.lr(0), s.lr(4), s.lr(9)), (0.1, 0.5, 1.0), "{d}");
            assert_eq!(s.lr(10), 1.0, "{d}: the peak right after the warm-up");
            let lrs: Vec<f64> = (10..110).map(|i| s.lr(i)).collect();
            assert!(lrs.windows(2).all(|w| w[1] <= w[0]), "{d}: never rises after the warm-up");
            assert!(lrs.iter().all(|&l| (0.1 - 1e-12..=1.0).contains(&l)), "{d}: between the floor and the peak");
        }
        assert_eq!(schedule(DecayStyle::Constant).lr(109), 1.0);
        // Linear and cosine: halfway at p = 1/2 (step 60), the floor is reached as p reaches 1.
        assert!((schedule(DecayStyle::Linear).lr(60) - 0.55).abs() < 1e-12);
        assert!((schedule(DecayStyle::Cosine).lr(60) - 0.55).abs() < 1e-12);
        assert!((schedule(DecayStyle::Cosine).lr(110) - 0.1).abs() < 1e-12);
        // WSD: stable until the last tenth (10 steps), then down to the floor at the last step.
        let w = schedule(DecayStyle::Wsd);
        assert_eq!((w.lr(50), w.lr(99)), (1.0, 1.0));
        assert!(w.lr(100) < 1.0 && (w.lr(104) - 0.55).abs() < 1e-12 && (w.lr(109) - 0.1).abs() < 1e-12);
        let short = LrScheduleConfig::new(1.0, 110).with_warmup_steps(10).with_decay(DecayStyle::Wsd).with_decay_steps(Some(2)).init().unwrap();
        assert_eq!((short.lr(107), short.lr(108), short.lr(109)), (1.0, 0.55, 0.1));
    }

    #[test]
    fn the_cosine_default_is_the_examples_former_formula() {
        // η · (0.1 + 0.9 · (1 + cos πp) / 2), as gpt_pretrain computed it before this module.
        let s = LrScheduleConfig::new(6e-4, 300).with_warmup_steps(20).init().unwrap();
        for step in [20, 77, 150, 299] {
            let p = (step - 20) as f64 / 280.0;
            let old = 6e-4 * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()));
            assert_eq!(s.lr(step), old, "step {step}");
        }
    }

    #[test]
    fn impossible_schedules_are_errors_with_the_numbers() {
        let e = |c: LrScheduleConfig| c.init().unwrap_err().to_string();
        // A warm-up past the run's end: the run ends in it.
        let long = LrScheduleConfig::new(1.0, 5).with_warmup_steps(20).init().unwrap();
        assert_eq!((long.lr(0), long.lr(4)), (0.05, 0.25));
        assert!(e(LrScheduleConfig::new(1.0, 5).with_min_ratio(1.5)).contains("got 1.5"));
        assert!(e(LrScheduleConfig::new(f64::NAN, 5)).contains("got NaN"));
        let wsd = LrScheduleConfig::new(1.0, 10).with_warmup_steps(4).with_decay(DecayStyle::Wsd);
        assert_eq!(e(wsd.clone().with_decay_steps(Some(7))), "7 decay steps do not fit the 6 steps after the warm-up");
        assert!(wsd.clone().with_decay_steps(Some(6)).init().is_ok());
        assert_eq!(e(wsd.with_decay_steps(Some(0))), "a WSD schedule needs at least 1 decay step");
        assert_eq!("wsd".parse::<DecayStyle>(), Ok(DecayStyle::Wsd));
        assert!("step".parse::<DecayStyle>().unwrap_err().contains("constant, linear, cosine or wsd"));
    }
}
