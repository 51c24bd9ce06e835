//! # burn-parallel
//!
//! Model-parallel training on [Burn](https://burn.dev): tensor, sequence, pipeline and data
//! parallelism, with every layout runnable on CPU threads and checked against the single-device
//! model.
//!
//! Main types:
//! - [`ParallelConfig`]: the degrees (dp, cp, pp, tp, virtual stages, sequence parallel),
//!   Megatron rank order and groups; [`ProcessGroups`]: one rank's communicators.
//! - [`ContextParallel`]: a sequence split over ranks (load-balanced chunks, keys and values
//!   all-gathered in attention).
//! - [`Communicator`] / [`Comm`]: collectives and point-to-point; [`LocalWorld`] runs ranks as
//!   threads; [`run_world`] drives a world and collects each rank's result or error.
//! - [`mappings`]: Megatron's f/g and the sequence-parallel mappings as autodiff ops.
//! - [`CollectiveBackend`]: how a Burn backend moves tensors (host-staged by default).
//!
//! The parallel layers and the GPT live in the `burn-parallel-modules` crate.
//!
//! ```
//! use burn::backend::{Autodiff, Flex};
//! use burn::tensor::Tensor;
//! use burn_parallel::{mappings, run_world, LocalWorldOptions};
//!
//! type B = Autodiff<Flex>;
//! // Two ranks: y = g(f(x) * w_r) where each rank holds its own weight w_r.
//! let results = run_world(2, LocalWorldOptions::default(), |comm| {
//!     let dev = Default::default();
//!     let x = Tensor::<B, 1>::from_floats([1.0, 2.0], &dev).require_grad();
//!     let w = (comm.rank() + 1) as f32;
//!     let y = mappings::reduce_from_tp(mappings::copy_to_tp(x.clone(), &comm) * w, &comm);
//!     let grads = y.sum().backward();
//!     let dx = x.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap();
//!     Ok::<_, String>(dx)
//! });
//! for r in results {
//!     assert_eq!(r.unwrap(), vec![3.0, 3.0]); // dx = w_0 + w_1 on every rank
//! }
//! ```

pub mod activation;
pub mod arch;
pub mod attention;
pub mod checkpoint;
pub mod collective;
pub mod comm;
pub mod context;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda-source")]
pub mod cuda_source;
pub mod data;
pub mod data_parallel;
pub mod error;
#[cfg(feature = "cube")]
mod fusion_bridge;
pub mod grad;
pub mod kernels;
pub mod launch;
pub mod mappings;
pub mod memory;
pub mod metrics;
pub mod optim;
pub mod params;
pub mod pipeline;
pub mod precision;
pub mod preempt;
pub mod presets;
pub mod qkv;
pub mod recompute;
pub mod rng;
pub mod sharding;
pub mod timing;
pub mod topology;
pub mod world;

#[doc(hidden)]
pub use tracing as __tracing;

pub use collective::CollectiveBackend;
#[cfg(feature = "cuda")]
pub use comm::nccl::{NcclComm, NcclId, NcclOptions};
pub use comm::{Comm, Communicator, LocalWorld, LocalWorldOptions, P2pMode, RecvOp, ReduceOp, SendOp, TcpComm, TensorSpec};
pub use context::ContextParallel;
pub use error::{CommError, ConfigError, RankError};
pub use grad::{backward_with, BackwardWith, GradMismatch};
pub use kernels::{LayerNormBackend, ParallelBackend};
pub use topology::{ModelDims, ParallelConfig, ProcessGroups, RankCoords};
pub use world::{all_ok, run_world};
