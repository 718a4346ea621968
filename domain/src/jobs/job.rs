//! The Job aggregate.

use super::{JobId, JobType, Payload, RetryPolicy, Timestamp};
use crate::{Aggregate, DomainEvent};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleJob {
    pub id: JobId,
    pub job_type: JobType,
    pub payload: Payload,
    pub due_at: Timestamp,
    /// Two schedules with one key (of one type) are one job: its id follows from the key.
    pub unique_key: Option<String>,
    pub policy: RetryPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobCommand {
    Schedule(ScheduleJob),
    /// A scheduler starts the next attempt of a due job (`at`: its clock).
    Start {
        at: Timestamp,
    },
    /// The attempt's handler finished.
    Succeed {
        attempt: u32,
        at: Timestamp,
    },
    /// The attempt's handler failed: a system error is retried, a business refusal is final.
    Fail {
        attempt: u32,
        at: Timestamp,
        error: String,
        retry: bool,
    },
    /// The running attempt is past its deadline: its worker died or hangs. Counts as a failure.
    Expire {
        at: Timestamp,
    },
    Cancel {
        at: Timestamp,
    },
    /// By hand, after the job failed or was dead-lettered: due at once, with its attempts anew.
    Retry {
        at: Timestamp,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEvent {
    Scheduled {
        id: JobId,
        job_type: JobType,
        payload: Payload,
        due_at: Timestamp,
        unique_key: Option<String>,
        policy: RetryPolicy,
    },
    AttemptStarted {
        attempt: u32,
        at: Timestamp,
        /// Past it, the attempt counts as failed.
        deadline: Timestamp,
    },
    Succeeded {
        attempt: u32,
        at: Timestamp,
    },
    /// `retry_at`: when the next attempt is due; none, and the job is dead-lettered or failed.
    AttemptFailed {
        attempt: u32,
        at: Timestamp,
        error: String,
        retry_at: Option<Timestamp>,
    },
    /// Its attempts ran out on system errors.
    DeadLettered {
        at: Timestamp,
    },
    /// A business refusal: retrying would be refused again.
    Failed {
        at: Timestamp,
    },
    Cancelled {
        at: Timestamp,
    },
    Retried {
        at: Timestamp,
    },
}

impl DomainEvent for JobEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Scheduled { .. } => "JobScheduled",
            Self::AttemptStarted { .. } => "JobAttemptStarted",
            Self::Succeeded { .. } => "JobSucceeded",
            Self::AttemptFailed { .. } => "JobAttemptFailed",
            Self::DeadLettered { .. } => "JobDeadLettered",
            Self::Failed { .. } => "JobFailed",
            Self::Cancelled { .. } => "JobCancelled",
            Self::Retried { .. } => "JobRetried",
        }
    }

    fn schema_version(&self) -> u32 {
        1
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    #[error("the job exists (a job with this unique key is scheduled already)")]
    Exists,
    #[error("no such job")]
    NoJob,
    #[error("the job is not due yet")]
    NotDue,
    #[error("the job is not waiting for an attempt")]
    NotPending,
    #[error("no attempt of the job is running")]
    NotRunning,
    #[error("that attempt is over (it timed out, or the job was cancelled)")]
    StaleAttempt,
    #[error("the running attempt is within its deadline")]
    WithinDeadline,
    #[error("the job is finished")]
    Finished,
    #[error("only a failed or dead-lettered job can be retried")]
    NotRetryable,
}

impl From<JobError> for crate::DomainError {
    fn from(error: JobError) -> Self {
        match error {
            JobError::NoJob => Self::not_found(error.to_string()),
            _ => Self::conflict(error.to_string()),
        }
    }
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum JobStatus {
    /// Waiting for its next attempt.
    Pending {
        due_at: Timestamp,
    },
    Running {
        attempt: u32,
        deadline: Timestamp,
    },
    Succeeded {
        at: Timestamp,
    },
    Failed {
        at: Timestamp,
    },
    DeadLettered {
        at: Timestamp,
    },
    Cancelled {
        at: Timestamp,
    },
}

impl JobStatus {
    /// When the scheduler must act on the job next: its due time, or its running attempt's
    /// deadline. Finished jobs need nothing.
    pub fn next_action_at(&self) -> Option<Timestamp> {
        match self {
            Self::Pending { due_at } => Some(*due_at),
            Self::Running { deadline, .. } => Some(*deadline),
            Self::Succeeded { .. } | Self::Failed { .. } | Self::DeadLettered { .. } | Self::Cancelled { .. } => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JobState {
    pub id: JobId,
    pub job_type: JobType,
    pub payload: Payload,
    pub unique_key: Option<String>,
    pub policy: RetryPolicy,
    pub status: JobStatus,
    /// Attempts started so far.
    pub attempts: u32,
    /// Attempts started before the last retry by hand: the policy's budget counts from there.
    pub attempts_before_retry: u32,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Job {
    #[default]
    None,
    Exists(JobState),
}

impl Job {
    pub fn state(&self) -> Option<&JobState> {
        match self {
            Self::None => None,
            Self::Exists(state) => Some(state),
        }
    }

    fn existing(&self) -> Result<&JobState, JobError> {
        self.state().ok_or(JobError::NoJob)
    }
}

impl JobState {
    /// The events that end `attempt` in failure at `at`: a retry when the budget allows and the
    /// error is a system error, otherwise the job's end.
    fn failure(&self, attempt: u32, at: Timestamp, error: String, retry: bool) -> Vec<JobEvent> {
        let used = attempt.saturating_sub(self.attempts_before_retry);
        let retry_at =
            (retry && used < self.policy.max_attempts).then(|| at.plus_millis(self.policy.delay(self.id, used)));
        let failed = JobEvent::AttemptFailed { attempt, at, error, retry_at };
        match (retry_at, retry) {
            (Some(_), _) => vec![failed],
            (None, true) => vec![failed, JobEvent::DeadLettered { at }],
            (None, false) => vec![failed, JobEvent::Failed { at }],
        }
    }
}

impl Aggregate for Job {
    type Command = JobCommand;
    type Event = JobEvent;
    type Error = JobError;

    fn decide(&self, command: JobCommand) -> Result<Vec<JobEvent>, JobError> {
        if let JobCommand::Schedule(schedule) = command {
            return match self {
                Self::None => Ok(vec![JobEvent::Scheduled {
                    id: schedule.id,
                    job_type: schedule.job_type,
                    payload: schedule.payload,
                    due_at: schedule.due_at,
                    unique_key: schedule.unique_key,
                    policy: schedule.policy,
                }]),
                Self::Exists(_) => Err(JobError::Exists),
            };
        }
        let job = self.existing()?;
        let finished = matches!(
            job.status,
            JobStatus::Succeeded { .. }
                | JobStatus::Failed { .. }
                | JobStatus::DeadLettered { .. }
                | JobStatus::Cancelled { .. }
        );
        match command {
            JobCommand::Schedule(_) => unreachable!("decided above"),
            JobCommand::Start { at } => match job.status {
                JobStatus::Pending { due_at } if due_at <= at => Ok(vec![JobEvent::AttemptStarted {
                    attempt: job.attempts + 1,
                    at,
                    deadline: at.plus_millis(job.policy.attempt_timeout_ms),
                }]),
                JobStatus::Pending { .. } => Err(JobError::NotDue),
                _ => Err(JobError::NotPending),
            },
            JobCommand::Succeed { attempt, at } => match job.status {
                JobStatus::Running { attempt: running, .. } if running == attempt => {
                    Ok(vec![JobEvent::Succeeded { attempt, at }])
                }
                JobStatus::Running { .. } => Err(JobError::StaleAttempt),
                _ if attempt <= job.attempts => Err(JobError::StaleAttempt),
                _ => Err(JobError::NotRunning),
            },
            JobCommand::Fail { attempt, at, error, retry } => match job.status {
                JobStatus::Running { attempt: running, .. } if running == attempt => {
                    Ok(job.failure(attempt, at, error, retry))
                }
                JobStatus::Running { .. } => Err(JobError::StaleAttempt),
                _ if attempt <= job.attempts => Err(JobError::StaleAttempt),
                _ => Err(JobError::NotRunning),
            },
            JobCommand::Expire { at } => match job.status {
                JobStatus::Running { attempt, deadline } if deadline <= at => {
                    Ok(job.failure(attempt, at, "the attempt timed out".to_owned(), true))
                }
                JobStatus::Running { .. } => Err(JobError::WithinDeadline),
                _ => Err(JobError::NotRunning),
            },
            JobCommand::Cancel { at } if !finished => Ok(vec![JobEvent::Cancelled { at }]),
            JobCommand::Cancel { .. } => Err(JobError::Finished),
            JobCommand::Retry { at } => match job.status {
                JobStatus::Failed { .. } | JobStatus::DeadLettered { .. } => Ok(vec![JobEvent::Retried { at }]),
                _ => Err(JobError::NotRetryable),
            },
        }
    }

    fn evolve(self, event: &JobEvent) -> Self {
        let Self::Exists(mut job) = self else {
            return match event {
                JobEvent::Scheduled { id, job_type, payload, due_at, unique_key, policy } => Self::Exists(JobState {
                    id: *id,
                    job_type: job_type.clone(),
                    payload: payload.clone(),
                    unique_key: unique_key.clone(),
                    policy: *policy,
                    status: JobStatus::Pending { due_at: *due_at },
                    attempts: 0,
                    attempts_before_retry: 0,
                    last_error: None,
                }),
                // Nothing else can come first.
                _ => Self::None,
            };
        };
        match event {
            JobEvent::Scheduled { .. } => {}
            JobEvent::AttemptStarted { attempt, deadline, .. } => {
                job.attempts = *attempt;
                job.status = JobStatus::Running { attempt: *attempt, deadline: *deadline };
            }
            JobEvent::Succeeded { at, .. } => job.status = JobStatus::Succeeded { at: *at },
            JobEvent::AttemptFailed { error, retry_at, .. } => {
                job.last_error = Some(error.clone());
                if let Some(due_at) = retry_at {
                    job.status = JobStatus::Pending { due_at: *due_at };
                }
            }
            JobEvent::DeadLettered { at } => job.status = JobStatus::DeadLettered { at: *at },
            JobEvent::Failed { at } => job.status = JobStatus::Failed { at: *at },
            JobEvent::Cancelled { at } => job.status = JobStatus::Cancelled { at: *at },
            JobEvent::Retried { at } => {
                job.attempts_before_retry = job.attempts;
                job.status = JobStatus::Pending { due_at: *at };
            }
        }
        Self::Exists(job)
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;

    fn at(millis: i64) -> Timestamp {
        Timestamp::from_millis(millis)
    }

    fn policy() -> RetryPolicy {
        RetryPolicy { max_attempts: 3, base_delay_ms: 1_000, max_delay_ms: 10_000, attempt_timeout_ms: 5_000 }
    }

    fn scheduled(due: i64) -> Job {
        let schedule = ScheduleJob {
            id: JobId::from_uuid(Uuid::from_u128(7)),
            job_type: JobType::parse("test.job").unwrap(),
            payload: Payload::parse("{}".into()).unwrap(),
            due_at: at(due),
            unique_key: None,
            policy: policy(),
        };
        apply(Job::None, JobCommand::Schedule(schedule))
    }

    fn apply(job: Job, command: JobCommand) -> Job {
        let events = job.decide(command).unwrap();
        events.iter().fold(job, Job::evolve)
    }

    fn status(job: &Job) -> JobStatus {
        job.state().unwrap().status
    }

    #[test]
    fn a_due_job_is_attempted_and_succeeds_once() {
        let job = scheduled(1_000);
        assert_eq!(job.decide(JobCommand::Start { at: at(999) }), Err(JobError::NotDue), "never before its time");
        let job = apply(job, JobCommand::Start { at: at(1_200) });
        assert_eq!(status(&job), JobStatus::Running { attempt: 1, deadline: at(6_200) });
        assert_eq!(job.decide(JobCommand::Start { at: at(1_300) }), Err(JobError::NotPending), "one attempt at a time");
        let job = apply(job, JobCommand::Succeed { attempt: 1, at: at(1_500) });
        assert_eq!(status(&job), JobStatus::Succeeded { at: at(1_500) });
        assert_eq!(status(&job).next_action_at(), None);
        assert_eq!(job.decide(JobCommand::Succeed { attempt: 1, at: at(1_600) }), Err(JobError::StaleAttempt));
        assert_eq!(job.decide(JobCommand::Cancel { at: at(1_600) }), Err(JobError::Finished));
    }

    #[test]
    fn system_errors_are_retried_on_the_policy_s_schedule_then_dead_lettered() {
        let mut job = scheduled(0);
        let mut now = 0;
        let mut retries = Vec::new();
        for attempt in 1..=3 {
            job = apply(job, JobCommand::Start { at: at(now) });
            let events = job
                .decide(JobCommand::Fail { attempt, at: at(now), error: "broker down".into(), retry: true })
                .unwrap();
            job = events.iter().fold(job, Job::evolve);
            match status(&job) {
                JobStatus::Pending { due_at } => {
                    let delay = (due_at.as_millis() - now) as u64;
                    assert_eq!(delay, policy().delay(JobId::from_uuid(Uuid::from_u128(7)), attempt));
                    assert!(delay <= policy().cap(attempt));
                    retries.push(delay);
                    now = due_at.as_millis();
                }
                other => {
                    assert_eq!(attempt, 3, "dead-lettered only when the attempts run out");
                    assert_eq!(other, JobStatus::DeadLettered { at: at(now) });
                    assert!(matches!(
                        events.as_slice(),
                        [JobEvent::AttemptFailed { retry_at: None, .. }, JobEvent::DeadLettered { .. }]
                    ));
                }
            }
        }
        assert_eq!(retries.len(), 2);
        assert_eq!(job.state().unwrap().last_error.as_deref(), Some("broker down"));

        // Retried by hand: due at once, with the policy's attempts anew.
        let job = apply(job, JobCommand::Retry { at: at(now + 10) });
        assert_eq!(status(&job), JobStatus::Pending { due_at: at(now + 10) });
        let job = apply(job, JobCommand::Start { at: at(now + 10) });
        assert_eq!(status(&job), JobStatus::Running { attempt: 4, deadline: at(now + 5_010) });
        let job = apply(job, JobCommand::Fail { attempt: 4, at: at(now + 20), error: "again".into(), retry: true });
        assert!(matches!(status(&job), JobStatus::Pending { .. }), "the retry by hand has its own budget");
    }

    #[test]
    fn a_business_refusal_is_final() {
        let job = apply(scheduled(0), JobCommand::Start { at: at(0) });
        let job = apply(job, JobCommand::Fail { attempt: 1, at: at(5), error: "no such post".into(), retry: false });
        assert_eq!(status(&job), JobStatus::Failed { at: at(5) });
        assert_eq!(job.decide(JobCommand::Start { at: at(10_000) }), Err(JobError::NotPending));
    }

    #[test]
    fn an_attempt_past_its_deadline_fails_and_its_late_answer_is_refused() {
        let job = apply(scheduled(0), JobCommand::Start { at: at(0) });
        assert_eq!(job.decide(JobCommand::Expire { at: at(4_999) }), Err(JobError::WithinDeadline));
        let job = apply(job, JobCommand::Expire { at: at(5_000) });
        assert!(matches!(status(&job), JobStatus::Pending { .. }));
        assert_eq!(job.state().unwrap().last_error.as_deref(), Some("the attempt timed out"));
        assert_eq!(job.decide(JobCommand::Succeed { attempt: 1, at: at(5_001) }), Err(JobError::StaleAttempt));
    }

    #[test]
    fn a_cancelled_job_is_never_attempted_and_a_schedule_is_made_once() {
        let job = scheduled(1_000);
        let again = ScheduleJob {
            id: JobId::from_uuid(Uuid::from_u128(7)),
            job_type: JobType::parse("test.job").unwrap(),
            payload: Payload::parse("{}".into()).unwrap(),
            due_at: at(5),
            unique_key: None,
            policy: policy(),
        };
        assert_eq!(job.decide(JobCommand::Schedule(again)), Err(JobError::Exists));
        let job = apply(job, JobCommand::Cancel { at: at(10) });
        assert_eq!(status(&job), JobStatus::Cancelled { at: at(10) });
        assert_eq!(job.decide(JobCommand::Start { at: at(2_000) }), Err(JobError::NotPending));
        assert_eq!(job.decide(JobCommand::Retry { at: at(2_000) }), Err(JobError::NotRetryable));
        assert_eq!(Job::None.decide(JobCommand::Start { at: at(0) }), Err(JobError::NoJob));
    }
}
