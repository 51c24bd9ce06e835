//! Errors of schedule generation, validation and simulation.

/// Why a plan cannot be made or run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// A count is zero or a combination is unsupported.
    #[error("invalid pipeline shape: {0}")]
    InvalidShape(String),
    /// Too few micro-batches for the schedule (warm-up would hang; torchtitan#775).
    #[error("schedule {schedule} needs at least {needed} micro-batches for {ranks} pipeline ranks, got {microbatches}")]
    TooFewMicrobatches {
        /// Schedule name.
        schedule: String,
        /// Micro-batches given.
        microbatches: usize,
        /// Pipeline ranks.
        ranks: usize,
        /// Minimum.
        needed: usize,
    },
    /// No schedule of that name.
    #[error("unknown schedule {name:?}; known: {known}")]
    UnknownSchedule {
        /// Requested name.
        name: String,
        /// Comma-separated known names.
        known: String,
    },
    /// A malformed plan (text of an action, or a rule of the validator).
    #[error("invalid plan: {0}")]
    Invalid(String),
    /// An action could not be parsed.
    #[error("{0}")]
    Parse(String),
    /// Under NCCL's in-order matching, a sender and its receiver list their messages in different
    /// orders.
    #[error("p2p order mismatch: rank {from} sends to rank {to} in the order [{sent}] but rank {to} receives [{received}]")]
    P2pOrder {
        /// Sending rank.
        from: usize,
        /// Receiving rank.
        to: usize,
        /// Messages as sent (`<stage>F<mb>` activations, `<stage>B<mb>` gradients).
        sent: String,
        /// Messages as received.
        received: String,
    },
    /// Ranks wait for each other forever.
    #[error("deadlock: schedule is not progressing; blocked: {0}")]
    Deadlock(String),
}
