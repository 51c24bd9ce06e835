//! Memory per rank: measured ([`tracker`]: host allocations attributed to rank threads) and
//! predicted ([`model`]: from the shapes, the layout and the options).

pub mod model;
pub mod tracker;

pub use model::{estimate, GptShape, RankMemory, TrainPlan};
pub use tracker::{adopt, current, installed, peak, reset_peak, set_rank, TrackingAllocator};
