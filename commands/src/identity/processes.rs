//! The identity service's processes, each of two services (see [`crate::process`]):
//!
//! - **registration**: auth stores the password (a hash auth made first, storing nothing), then
//!   the user is registered here. Interrupted, it is completed: the owner of the user's partition
//!   stores the password again (the same step command: its first result) and registers the user.
//!   Should a step be refused (the email was taken over meanwhile), it is undone: the password is
//!   removed and the email's reservation released. A password without its user is never used
//!   (logins find users by their email in the users read model), so no moment of the process
//!   lets anyone in who should not be.
//! - **erasure**: the user's personal data is erased here, then auth removes the password.
//!   Interrupted, it is completed the same way.
//!
//! The run that began a process holds it for `2 × identity.command_timeout_ms` (past its
//! command's deadline) and finishes it; one that died between the steps leaves it to the owner of
//! the user's partition, which runs it again once that claim ran out.

use std::{sync::Arc, time::Duration};

use keel_domain::identity::{DisplayName, Email, RegisterUser, User, UserCommand, UserId};
use keel_proto::{
    auth::v1::{HashPasswordRequest, RemovePasswordRequest, SetPasswordRequest},
    common::v1::CommandReply,
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::{grpc::IdentityGrpc, model::Users};
use crate::{
    CommandMeta,
    engine::Command,
    grpc::{execute, is_answer, metadata, reply},
    process::{Due, ProcessError, Sealing},
};

const REGISTRATION: &str = "registration";
const ERASURE: &str = "erasure";

/// What a registration's steps need. Sealed with the user's data key.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Registration {
    meta: CommandMeta,
    user_id: UserId,
    email: String,
    display_name: String,
    password_hash: String,
}

impl Registration {
    /// The user's command of the registration, and the address it takes.
    fn command(&self) -> Result<(Email, Command<Users>), Status> {
        let email = Email::parse(&self.email).map_err(|error| Status::internal(error.to_string()))?;
        let display_name =
            DisplayName::parse(&self.display_name).map_err(|error| Status::internal(error.to_string()))?;
        let register = UserCommand::Register(RegisterUser { id: self.user_id, email: email.clone(), display_name });
        Ok((email, Command::new(self.user_id.as_uuid(), self.meta.clone(), "RegisterUser", register)))
    }
}

/// What an erasure's steps need.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Erasure {
    meta: CommandMeta,
    user_id: UserId,
    expected_version: Option<u64>,
}

/// How often the owner of a partition looks for its interrupted processes.
const RECOVERY_INTERVAL: Duration = Duration::from_secs(5);
/// Most interrupted processes of a kind run again in one round.
const RECOVERY_BATCH: i64 = 100;

fn process_failed(error: ProcessError) -> Status {
    tracing::error!(%error, "the process store failed");
    Status::unavailable("cannot record the command's progress now; retry with the same command id")
}

impl IdentityGrpc {
    /// Registers `id` (the caller found that this instance owns its partition): reserves the
    /// email, has auth hash the password, records the process, and runs its steps.
    pub(super) async fn register_here(
        &self,
        id: UserId,
        email: Email,
        display_name: DisplayName,
        password: String,
        meta: CommandMeta,
    ) -> Result<CommandReply, Status> {
        let register =
            UserCommand::Register(RegisterUser { id, email: email.clone(), display_name: display_name.clone() });
        if self.is_registered(id).await? {
            // A retry of a registration that is complete: its first result (a refusal once it is
            // older than the user's last 64 commands), and nothing runs again.
            return execute(&self.users, Command::new(id.as_uuid(), meta, "RegisterUser", register)).await;
        }
        self.reserve(&email, id).await?;
        let request = HashPasswordRequest { email: email.as_str().to_owned(), password };
        let hash = self.auth.hash_password(request).await?;
        let registration = Registration {
            meta: meta.clone(),
            user_id: id,
            email: email.as_str().to_owned(),
            display_name: display_name.as_str().to_owned(),
            password_hash: hash.phc,
        };
        let at = (id.as_uuid(), self.users.partition_of(id.as_uuid()));
        // A retry runs the registration as it was first begun.
        let registration = self
            .processes
            .begin(REGISTRATION, meta.command_id, at, registration, Sealing::Sealed, self.process_lease)
            .await
            .map_err(process_failed)?;
        self.register(&registration, 0).await
    }

    /// Whether the user `id` exists (or existed: an erased one), as its partition's owner knows.
    async fn is_registered(&self, id: UserId) -> Result<bool, Status> {
        Ok(!matches!(self.users.read_here(id.as_uuid()).await?.state, User::Unregistered))
    }

    /// Runs a registration's steps (after `attempts` earlier runs) and settles it: forgotten
    /// once complete or undone, kept for another run when its outcome is unknown.
    async fn register(&self, registration: &Registration, attempts: i32) -> Result<CommandReply, Status> {
        let outcome = self.registration_steps(registration).await;
        let id = registration.meta.command_id;
        match &outcome {
            Ok(_) => self.finish(id).await,
            // A refusal of a user that exists is not this registration's to undo (a retry long
            // after it completed): there is nothing left to do.
            Err(status) if is_answer(status) => match self.is_registered(registration.user_id).await {
                Ok(true) => self.finish(id).await,
                Ok(false) => {
                    tracing::info!(process = %id, code = ?status.code(), "a registration was refused; undoing it");
                    if self.undo_registration(registration).await {
                        self.finish(id).await;
                    }
                }
                Err(unknown) => self.failed(id, attempts, &unknown).await,
            },
            Err(status) => self.failed(id, attempts, status).await,
        }
        outcome
    }

    async fn registration_steps(&self, registration: &Registration) -> Result<CommandReply, Status> {
        let Registration { meta, user_id, password_hash, .. } = registration;
        let (email, register) = registration.command()?;
        let set = SetPasswordRequest {
            metadata: Some(metadata(&meta.step("SetPassword"))),
            user_id: user_id.to_string(),
            password_hash: password_hash.clone(),
        };
        self.auth.set_password(set).await?;
        self.between_steps(REGISTRATION).await;
        // Reserved again right before the user is registered, so the reservation is younger
        // than any takeover age while the registration can still land (the address may also
        // have been taken over while the process was interrupted: then it is refused).
        self.reserve(&email, *user_id).await?;
        execute(&self.users, register).await
    }

    /// Runs an interrupted registration again: one that is complete already (the run that
    /// completed it died before forgetting it) answers with its first result and runs nothing
    /// again. (A run that begins a registration has just checked this itself.)
    async fn register_again(&self, registration: &Registration, attempts: i32) -> Result<CommandReply, Status> {
        let user_id = registration.user_id;
        match self.is_registered(user_id).await {
            Ok(true) => {
                self.finish(registration.meta.command_id).await;
                execute(&self.users, registration.command()?.1).await
            }
            Ok(false) => self.register(registration, attempts).await,
            Err(status) => {
                self.failed(registration.meta.command_id, attempts, &status).await;
                Err(status)
            }
        }
    }

    /// Takes back what a refused registration did: its password and its email's reservation.
    /// Whether it is undone (else it is tried again later).
    async fn undo_registration(&self, registration: &Registration) -> bool {
        let remove = RemovePasswordRequest {
            metadata: Some(metadata(&registration.meta.step("UndoRegistration"))),
            user_id: registration.user_id.to_string(),
        };
        if let Err(status) = self.auth.remove_password(remove).await {
            tracing::warn!(code = ?status.code(), message = status.message(), "failed to undo a registration; retrying later");
            return false;
        }
        if let Ok(email) = Email::parse(&registration.email)
            && let Err(error) = self.claims.release(&email, registration.user_id).await
        {
            tracing::warn!(%error, "failed to release a refused registration's reservation; a takeover will");
        }
        metrics::counter!("keel_processes_undone_total", "kind" => REGISTRATION, "service" => "identity").increment(1);
        true
    }

    /// Erases `id`'s personal data (the caller found that this instance owns its partition),
    /// then has auth remove their password.
    pub(super) async fn erase_here(
        &self,
        id: UserId,
        expected_version: Option<u64>,
        meta: CommandMeta,
    ) -> Result<CommandReply, Status> {
        let erasure = Erasure { meta: meta.clone(), user_id: id, expected_version };
        let at = (id.as_uuid(), self.users.partition_of(id.as_uuid()));
        let erasure = self
            .processes
            .begin(ERASURE, meta.command_id, at, erasure, Sealing::Plain, self.process_lease)
            .await
            .map_err(process_failed)?;
        self.erase(&erasure, 0).await
    }

    async fn erase(&self, erasure: &Erasure, attempts: i32) -> Result<CommandReply, Status> {
        let outcome = self.erasure_steps(erasure).await;
        let id = erasure.meta.command_id;
        match &outcome {
            // Refused (a stale If-Match, an unknown user): nothing happened.
            Ok(_) => self.finish(id).await,
            Err(status) if is_answer(status) => self.finish(id).await,
            Err(status) => self.failed(id, attempts, status).await,
        }
        outcome
    }

    async fn erasure_steps(&self, erasure: &Erasure) -> Result<CommandReply, Status> {
        let Erasure { meta, user_id, expected_version } = erasure;
        let erase = Command::new(user_id.as_uuid(), meta.clone(), "ErasePersonalData", UserCommand::ErasePersonalData);
        let outcome = self.users.run(erase.expecting(*expected_version)).await?;
        // The erasure is in the log: the key and the reservations go now (and the users
        // projection shreds the key again when it applies the erasure, should this fail).
        if let Err(error) = self.users.model().vault().shred(user_id.as_uuid()).await {
            tracing::warn!(user = %user_id, %error, "failed to shred a key; the users projection will");
        }
        if let Err(error) = self.claims.release_all(*user_id).await {
            tracing::warn!(user = %user_id, %error, "failed to release an erased user's email reservations");
        }
        self.between_steps(ERASURE).await;
        let remove = RemovePasswordRequest {
            metadata: Some(metadata(&meta.step("RemovePassword"))),
            user_id: user_id.to_string(),
        };
        self.auth.remove_password(remove).await?;
        Ok(reply(&outcome.accepted))
    }

    async fn finish(&self, id: uuid::Uuid) {
        // Failing here leaves a complete process to be run again: its steps answer with their
        // first results.
        if let Err(error) = self.processes.finish(id).await {
            tracing::warn!(process = %id, %error, "failed to forget a complete process; it will run again");
        }
    }

    async fn failed(&self, id: uuid::Uuid, attempts: i32, status: &Status) {
        if let Err(error) = self.processes.failed(id, attempts, status.message()).await {
            tracing::warn!(process = %id, %error, "failed to record a process's failure");
        }
    }

    /// Test-only ([`IdentityGrpc::pause_between_steps`]): the process stops here for good, so a
    /// test can kill the instance between the steps.
    async fn between_steps(&self, kind: &'static str) {
        if self.pause_between_steps {
            tracing::warn!(kind, "pausing a process between its steps (identity.unsafe_pause_between_steps)");
            metrics::gauge!("keel_processes_paused", "kind" => kind).set(1.0);
            std::future::pending::<()>().await;
        }
    }

    /// Runs again, until shutdown, the interrupted processes of the users whose partitions this
    /// instance owns.
    pub(super) async fn recover(self: Arc<Self>, shutdown: CancellationToken) -> anyhow::Result<()> {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(RECOVERY_INTERVAL) => {}
            }
            for kind in [REGISTRATION, ERASURE] {
                if let Err(error) = self.recover_kind(kind).await {
                    tracing::warn!(kind, %error, "failed to look for interrupted processes; retrying");
                }
            }
        }
    }

    /// Claims the process `id` of `kind` for `lease` and runs its steps; `None` when another
    /// instance holds it or it is gone.
    async fn run_again(&self, kind: &'static str, due: Due) -> Result<Option<Result<(), Status>>, ProcessError> {
        let lease = self.process_lease;
        Ok(match kind {
            REGISTRATION => match self.processes.claim::<Registration>(kind, due.id, lease).await? {
                Some(registration) => Some(self.register_again(&registration, due.attempts).await.map(drop)),
                None => None,
            },
            _ => match self.processes.claim::<Erasure>(kind, due.id, lease).await? {
                Some(erasure) => Some(self.erase(&erasure, due.attempts).await.map(drop)),
                None => None,
            },
        })
    }

    async fn recover_kind(&self, kind: &'static str) -> Result<(), ProcessError> {
        // Only the partitions this instance owns: the users engine decides there, without a hop.
        let owned = self.users.owned_partitions();
        if owned.is_empty() {
            return Ok(());
        }
        for due in self.processes.due(kind, &owned, RECOVERY_BATCH).await? {
            let outcome = match self.run_again(kind, due).await {
                Ok(Some(outcome)) => outcome,
                // Another run holds it, or it completed meanwhile.
                Ok(None) => continue,
                Err(ProcessError::KeyGone(id)) => {
                    // Its user was erased since: the erasure removed the password too, and the
                    // registration can never happen.
                    tracing::info!(kind, process = %id, "forgetting a process whose user was erased");
                    self.finish(id).await;
                    continue;
                }
                Err(error) => {
                    // Unreadable: it stays, visible, and runs again after its backoff.
                    tracing::error!(kind, process = %due.id, %error, "cannot run an interrupted process");
                    self.processes.failed(due.id, due.attempts, &error.to_string()).await?;
                    continue;
                }
            };
            let label = match &outcome {
                Ok(()) => "completed",
                Err(status) if is_answer(status) => "refused",
                Err(_) => "failed",
            };
            tracing::info!(kind, process = %due.id, attempts = due.attempts, outcome = label, "ran an interrupted process again");
            metrics::counter!("keel_processes_recovered_total", "kind" => kind, "outcome" => label, "service" => "identity")
                .increment(1);
        }
        Ok(())
    }
}
