//! Background jobs as aggregates on the log. A job is scheduled (optionally under a unique key),
//! attempted — each attempt started, then succeeded or failed — retried with exponential backoff
//! and full jitter, dead-lettered when its attempts run out, failed for good on a business
//! refusal, cancelled, or retried by hand. Every decision is pure: the scheduler's clock comes in
//! the command, and the jitter is drawn from the job's id and attempt, so the same history always
//! decides the same schedule.

mod job;
mod retry;
mod values;

pub use job::{Job, JobCommand, JobError, JobEvent, JobState, JobStatus, ScheduleJob};
pub use retry::RetryPolicy;
pub use values::{JobId, JobType, Payload, Timestamp};
