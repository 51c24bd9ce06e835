//! # burn-parallel-modules
//!
//! Tensor-parallel layers and a GPT built on [`burn_parallel`]'s mappings. Each layer documents
//! its collectives (forward and backward) and per-rank shapes; with a TP group of one, each equals
//! its burn-nn counterpart (see [`reference`](mod@reference)).
//!
//! Main types: [`ColumnLinear`], [`RowLinear`], [`VocabParallelEmbedding`],
//! [`vocab_parallel_cross_entropy`], [`ParallelMlp`], [`ParallelAttention`], [`TransformerBlock`],
//! [`Gpt`].
//!
//! ```
//! use burn::backend::{Autodiff, Flex};
//! use burn::tensor::{Int, Tensor};
//! use burn_parallel::{run_world, LocalWorldOptions};
//! use burn_parallel_modules::GptConfig;
//!
//! type B = Autodiff<Flex>;
//! let config = GptConfig::new(16, 8, 16, 2, 1, 32);
//! // tp = 2: each rank holds half of every layer; the loss is the same on both.
//! let losses = run_world(2, LocalWorldOptions::default(), |tp| {
//!     let dev = Default::default();
//!     let gpt = config.init::<B>(&tp, &dev).map_err(|e| e.to_string())?;
//!     let ids = Tensor::<B, 2, Int>::from_ints([[1, 2, 3, 4]], &dev);
//!     let targets = Tensor::<B, 2, Int>::from_ints([[2, 3, 4, 5]], &dev);
//!     Ok::<f32, String>(gpt.loss(ids, targets).into_scalar())
//! });
//! let (a, b) = (losses[0].clone().unwrap(), losses[1].clone().unwrap());
//! assert_eq!(a, b);
//! ```

pub mod attention;
pub mod block;
pub mod column_linear;
pub mod context_parallel;
pub mod cross_entropy;
pub mod dropout;
pub mod embedding;
mod ends;
pub mod generate;
pub mod gpt;
pub mod gpt_pipeline;
pub mod init;
pub mod layer_norm;
pub mod mlp;
pub mod recompute;
pub mod reference;
pub mod rope;
pub mod row_linear;
pub mod tied_head;

pub use attention::{ParallelAttention, ParallelAttentionConfig};
pub use block::{TransformerBlock, TransformerBlockConfig};
pub use column_linear::{ColumnLinear, ColumnLinearConfig};
pub use cross_entropy::{vocab_parallel_cross_entropy, vocab_parallel_cross_entropy_per_token};
pub use dropout::{DropoutRegion, ParallelDropout};
pub use embedding::{VocabParallelEmbedding, VocabParallelEmbeddingConfig};
pub use gpt::{Gpt, GptConfig};
pub use gpt_pipeline::{GptPipeline, GptStage, TokenBatch};
pub use init::ParamInit;
pub use layer_norm::{ParallelLayerNorm, ParallelLayerNormConfig};
pub use mlp::{ParallelMlp, ParallelMlpConfig};
pub use row_linear::{RowLinear, RowLinearConfig};
pub use tied_head::{HeadWeight, TiedHead};
