//! # burn-parallel-schedules
//!
//! Pipeline schedules as data, with no tensors and no Burn dependency: a schedule produces, for
//! each pipeline rank, an ordered list of [`Action`]s (forward, backward — optionally split into
//! input- and weight-gradient parts — and the sends/receives between stages). The executor in
//! `burn-parallel` runs such a [`Plan`]; this crate generates, validates, simulates and renders it.
//!
//! Main items: [`Schedule`] (object-safe; [`schedule_by_name`]), [`GPipe`], [`OneFOneB`],
//! [`Interleaved1F1B`], [`ZeroBubbleH1`]; [`validate`]; [`simulate`] with [`Costs`] (makespan,
//! bubble, peak in-flight micro-batches, deadlock detection); [`render_grid`] and [`render_svg`].
//!
//! ```
//! use burn_parallel_schedules::{schedule_by_name, simulate, Costs, PipelineShape};
//!
//! let plan = schedule_by_name("1f1b")?.plan(&PipelineShape::new(4, 1, 8))?;
//! let sim = simulate(&plan, &Costs::uniform())?;
//! assert!((sim.bubble_fraction - 3.0 / 11.0).abs() < 1e-12); // (p−1)/(m+p−1)
//! assert_eq!(sim.peak_in_flight, vec![4, 3, 2, 1]);          // min(p−r, m)
//! # Ok::<(), burn_parallel_schedules::ScheduleError>(())
//! ```

mod action;
mod error;
mod lower;
pub mod p2p;
mod schedule;
mod simulate;
mod svg;
mod validate;

pub use action::{Action, Op, PipelineShape, Plan};
pub use error::ScheduleError;
pub use lower::lower;
pub use p2p::{check_rendezvous, make_rendezvous_safe, place_for_rendezvous, rendezvous_makespan, steps, Step};
pub use schedule::{schedule_by_name, GPipe, Interleaved1F1B, OneFOneB, Schedule, ZeroBubbleH1, SCHEDULE_NAMES};
pub use simulate::{render_grid, simulate, Costs, Simulation, Slot};
pub use svg::render_svg;
pub use validate::validate;
