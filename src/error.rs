//! Error types. User errors carry the numbers that make them actionable.

use std::time::Duration;

/// A bad parallel layout or a model that cannot be split the requested way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A parallel degree of zero.
    #[error("{name} must be at least 1 (got 0)")]
    ZeroDegree {
        /// Which degree (`data_parallel`, `pipeline_parallel`, `tensor_parallel`, ...).
        name: &'static str,
    },
    /// A model size of zero (hidden size, heads, layers, sequence length, ...).
    #[error("{what} must be at least 1 (got 0)")]
    ZeroSize {
        /// Which size.
        what: &'static str,
    },
    /// `dp * cp * pp * tp` does not match the number of ranks.
    #[error("world size {world} != data_parallel {dp} x context_parallel {cp} x pipeline_parallel {pp} x tensor_parallel {tp} = {product}")]
    WorldSizeMismatch {
        /// Number of ranks launched.
        world: usize,
        /// Data-parallel degree.
        dp: usize,
        /// Context-parallel degree.
        cp: usize,
        /// Pipeline-parallel degree.
        pp: usize,
        /// Tensor-parallel degree.
        tp: usize,
        /// `dp * cp * pp * tp`.
        product: usize,
    },
    /// A model dimension that must be split evenly is not divisible by a degree.
    #[error("{what} = {value} is not divisible by {degree_name} = {degree}")]
    NotDivisible {
        /// The model dimension (`hidden size`, `attention heads`, ...).
        what: &'static str,
        /// Its value.
        value: usize,
        /// The degree it is split by.
        degree_name: &'static str,
        /// The degree.
        degree: usize,
    },
    /// A rank index outside the world.
    #[error("rank {rank} is outside a world of {world} ranks")]
    RankOutOfRange {
        /// The rank.
        rank: usize,
        /// The world size.
        world: usize,
    },
    /// Any other invalid value.
    #[error("{0}")]
    Invalid(String),
}

/// A failed communication: every variant names the operation, the group and the ranks involved.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CommError {
    /// Some ranks never arrived at a collective (or never sent to a receiver) in time.
    #[error("timeout after {waited:?}: rank {rank} waited in {op} on group {group} but ranks {missing:?} never arrived")]
    Timeout {
        /// The operation, e.g. `all_reduce(sum) #3`.
        op: String,
        /// The group label, e.g. `tp[0,1]`.
        group: String,
        /// Global rank that waited.
        rank: usize,
        /// Global ranks that never arrived.
        missing: Vec<usize>,
        /// How long it waited.
        waited: Duration,
    },
    /// A rank of the group failed or exited while others waited for it.
    #[error("rank {rank} waited in {op} on group {group} but rank {peer} is gone: {reason}")]
    PeerGone {
        /// The operation.
        op: String,
        /// The group label.
        group: String,
        /// Global rank that waited.
        rank: usize,
        /// Global rank that is gone.
        peer: usize,
        /// Why (error text, panic message or "exited").
        reason: String,
    },
    /// Ranks of a group called different collectives at the same point (a program bug that would
    /// hang or corrupt data with NCCL).
    #[error("collective mismatch on group {group}: rank {rank} called {op} but rank {other_rank} called {other_op}")]
    Mismatch {
        /// The group label.
        group: String,
        /// Global rank reporting.
        rank: usize,
        /// Its operation.
        op: String,
        /// The other global rank.
        other_rank: usize,
        /// The other operation.
        other_op: String,
    },
    /// A receive got a tensor of another shape or dtype than it expected.
    #[error("p2p mismatch: rank {sender} sent {sent_shape:?} {sent_dtype} but rank {receiver} expected {expected_shape:?} {expected_dtype}")]
    P2pMismatch {
        /// Global rank of the sender.
        sender: usize,
        /// Global rank of the receiver.
        receiver: usize,
        /// Shape sent.
        sent_shape: Vec<usize>,
        /// Dtype sent.
        sent_dtype: String,
        /// Shape expected.
        expected_shape: Vec<usize>,
        /// Dtype expected.
        expected_dtype: String,
    },
    /// Shapes of the contributions to a collective disagree, or a dim is not divisible.
    #[error("bad collective input on group {group} in {op}: {detail}")]
    BadInput {
        /// The group label.
        group: String,
        /// The operation.
        op: String,
        /// What is wrong, with the numbers.
        detail: String,
    },
    /// A group that does not contain the caller, a duplicate rank, a peer outside the group.
    #[error("invalid group: {0}")]
    InvalidGroup(String),
    /// A backend (NCCL, CUDA driver) could not be loaded or failed.
    #[error("backend error: {0}")]
    Backend(String),
}

/// Why a rank of a [`run_world`](crate::world::run_world) did not return a value.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RankError {
    /// The rank's closure returned an error.
    #[error("rank {rank} failed: {message}")]
    Failed {
        /// Global rank.
        rank: usize,
        /// The error text.
        message: String,
    },
    /// A collective failed inside a model's forward or backward (reported there as a panic
    /// carrying the [`CommError`], since Burn's backward cannot return errors).
    #[error("rank {rank}: {error}")]
    Comm {
        /// Global rank.
        rank: usize,
        /// The communication error.
        error: CommError,
    },
    /// The rank panicked.
    #[error("rank {rank} panicked: {message}")]
    Panicked {
        /// Global rank.
        rank: usize,
        /// The panic message.
        message: String,
    },
}

impl RankError {
    /// The communication error behind this failure, if there is one.
    pub fn comm_error(&self) -> Option<&CommError> {
        match self {
            RankError::Comm { error, .. } => Some(error),
            _ => None,
        }
    }
}
