//! The User aggregate.

use crate::{Aggregate, DomainEvent};

use super::{Bio, DisplayName, Email, UserId};

/// Register a new user. That nobody else holds the email is established before deciding (the
/// identity service reserves it); uniqueness is a fact about all users, not about this one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterUser {
    pub id: UserId,
    pub email: Email,
    pub display_name: DisplayName,
}

/// Change what a user shows to others. A field left out, or set to what it already is, decides
/// no event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpdateProfile {
    pub display_name: Option<DisplayName>,
    pub bio: Option<Bio>,
}

/// Move a user to another email address, reserved for them before deciding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeEmail {
    pub email: Email,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserCommand {
    Register(RegisterUser),
    UpdateProfile(UpdateProfile),
    ChangeEmail(ChangeEmail),
    /// The account stops working: no login, no token of it is accepted. Its data stays.
    Deactivate,
    /// Forget everything personal about the user; only the id remains.
    ErasePersonalData,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRegistered {
    pub id: UserId,
    pub email: Email,
    pub display_name: DisplayName,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisplayNameChanged {
    pub id: UserId,
    pub display_name: DisplayName,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BioChanged {
    pub id: UserId,
    pub bio: Bio,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailChanged {
    pub id: UserId,
    pub email: Email,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserEvent {
    Registered(UserRegistered),
    DisplayNameChanged(DisplayNameChanged),
    BioChanged(BioChanged),
    EmailChanged(EmailChanged),
    Deactivated {
        id: UserId,
    },
    PersonalDataErased {
        id: UserId,
    },
    /// An event whose personal data can no longer be read: the user's key was erased, which
    /// happens only after their erasure is in the log. It counts for the version and leaves the
    /// user erased, as the erasure that follows it will anyway.
    Forgotten {
        id: UserId,
        event_type: &'static str,
    },
}

impl DomainEvent for UserEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Registered(_) => "UserRegistered",
            Self::DisplayNameChanged(_) => "UserDisplayNameChanged",
            Self::BioChanged(_) => "UserBioChanged",
            Self::EmailChanged(_) => "UserEmailChanged",
            Self::Deactivated { .. } => "UserDeactivated",
            Self::PersonalDataErased { .. } => "UserPersonalDataErased",
            Self::Forgotten { event_type, .. } => event_type,
        }
    }

    fn schema_version(&self) -> u32 {
        1
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    #[error("user {0} is already registered")]
    AlreadyRegistered(UserId),
    #[error("no such user")]
    NotRegistered,
    #[error("the account is deactivated")]
    Deactivated,
    #[error("the user's personal data was erased")]
    Erased,
}

impl From<UserError> for crate::DomainError {
    fn from(error: UserError) -> Self {
        match error {
            // The message names nobody: the id is the caller's own, or a guess.
            UserError::AlreadyRegistered(_) => Self::conflict("the user is already registered"),
            UserError::NotRegistered | UserError::Erased => Self::not_found(error.to_string()),
            UserError::Deactivated => Self::conflict(error.to_string()),
        }
    }
}

/// Whether an account can be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountStatus {
    Active,
    Deactivated,
}

/// A user as its own events describe it. Serializable so that command services can snapshot it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum User {
    #[default]
    Unregistered,
    Registered {
        id: UserId,
        email: Email,
        display_name: DisplayName,
        #[serde(default)]
        bio: Bio,
        #[serde(default = "active")]
        status: AccountStatus,
    },
    /// Personal data erased; the id stays so that nothing can be registered in its place.
    Erased { id: UserId },
}

fn active() -> AccountStatus {
    AccountStatus::Active
}

impl User {
    pub fn email(&self) -> Option<&Email> {
        match self {
            Self::Registered { email, .. } => Some(email),
            Self::Unregistered | Self::Erased { .. } => None,
        }
    }

    pub fn display_name(&self) -> Option<&DisplayName> {
        match self {
            Self::Registered { display_name, .. } => Some(display_name),
            Self::Unregistered | Self::Erased { .. } => None,
        }
    }

    pub fn status(&self) -> Option<AccountStatus> {
        match self {
            Self::Registered { status, .. } => Some(*status),
            Self::Unregistered | Self::Erased { .. } => None,
        }
    }

    /// The user's data, for a change that needs an active account.
    fn active(&self) -> Result<(UserId, &DisplayName, &Bio, &Email), UserError> {
        match self {
            Self::Unregistered => Err(UserError::NotRegistered),
            Self::Erased { .. } => Err(UserError::Erased),
            Self::Registered { status: AccountStatus::Deactivated, .. } => Err(UserError::Deactivated),
            Self::Registered { id, email, display_name, bio, status: AccountStatus::Active } => {
                Ok((*id, display_name, bio, email))
            }
        }
    }
}

impl Aggregate for User {
    type Command = UserCommand;
    type Event = UserEvent;
    type Error = UserError;

    fn decide(&self, command: UserCommand) -> Result<Vec<UserEvent>, UserError> {
        match command {
            UserCommand::Register(register) => match self {
                Self::Unregistered => Ok(vec![UserEvent::Registered(UserRegistered {
                    id: register.id,
                    email: register.email,
                    display_name: register.display_name,
                })]),
                Self::Registered { id, .. } | Self::Erased { id } => Err(UserError::AlreadyRegistered(*id)),
            },
            UserCommand::UpdateProfile(update) => {
                let (id, display_name, bio, _) = self.active()?;
                let mut events = Vec::new();
                if let Some(new) = update.display_name.filter(|new| new != display_name) {
                    events.push(UserEvent::DisplayNameChanged(DisplayNameChanged { id, display_name: new }));
                }
                if let Some(new) = update.bio.filter(|new| new != bio) {
                    events.push(UserEvent::BioChanged(BioChanged { id, bio: new }));
                }
                Ok(events)
            }
            UserCommand::ChangeEmail(change) => {
                let (id, _, _, email) = self.active()?;
                if *email == change.email {
                    return Ok(vec![]);
                }
                Ok(vec![UserEvent::EmailChanged(EmailChanged { id, email: change.email })])
            }
            UserCommand::Deactivate => match self {
                Self::Unregistered => Err(UserError::NotRegistered),
                Self::Erased { .. } => Err(UserError::Erased),
                Self::Registered { status: AccountStatus::Deactivated, .. } => Ok(vec![]),
                Self::Registered { id, .. } => Ok(vec![UserEvent::Deactivated { id: *id }]),
            },
            UserCommand::ErasePersonalData => match self {
                Self::Unregistered => Err(UserError::NotRegistered),
                Self::Erased { .. } => Ok(vec![]),
                Self::Registered { id, .. } => Ok(vec![UserEvent::PersonalDataErased { id: *id }]),
            },
        }
    }

    fn evolve(self, event: &UserEvent) -> Self {
        match (self, event) {
            (_, UserEvent::Registered(registered)) => Self::Registered {
                id: registered.id,
                email: registered.email.clone(),
                display_name: registered.display_name.clone(),
                bio: Bio::default(),
                status: AccountStatus::Active,
            },
            (_, UserEvent::PersonalDataErased { id } | UserEvent::Forgotten { id, .. }) => Self::Erased { id: *id },
            (Self::Registered { id, email, bio, status, .. }, UserEvent::DisplayNameChanged(changed)) => {
                Self::Registered { id, email, display_name: changed.display_name.clone(), bio, status }
            }
            (Self::Registered { id, email, display_name, status, .. }, UserEvent::BioChanged(changed)) => {
                Self::Registered { id, email, display_name, bio: changed.bio.clone(), status }
            }
            (Self::Registered { id, display_name, bio, status, .. }, UserEvent::EmailChanged(changed)) => {
                Self::Registered { id, email: changed.email.clone(), display_name, bio, status }
            }
            (Self::Registered { id, email, display_name, bio, .. }, UserEvent::Deactivated { .. }) => {
                Self::Registered { id, email, display_name, bio, status: AccountStatus::Deactivated }
            }
            // Events come from valid commits only, decided against a registered user; anything
            // else leaves the state as it is.
            (state, _) => state,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erased_users_are_gone_and_deactivated_ones_refuse() {
        use crate::{DomainError, Refusal};
        assert_eq!(DomainError::from(UserError::Erased).refusal, Refusal::NotFound);
        assert_eq!(DomainError::from(UserError::Deactivated).refusal, Refusal::Conflict);
        let taken = DomainError::from(UserError::AlreadyRegistered(UserId::from_uuid(uuid::Uuid::nil())));
        assert!(!taken.message.contains("00000000"), "a refusal names nobody: {taken}");
    }

    fn given(events: &[UserEvent]) -> User {
        events.iter().fold(User::default(), |state, event| state.evolve(event))
    }

    fn register(id: UserId, email: &str) -> UserCommand {
        UserCommand::Register(RegisterUser {
            id,
            email: Email::parse(email).unwrap(),
            display_name: DisplayName::parse("Ada").unwrap(),
        })
    }

    fn registered(id: UserId, email: &str) -> UserEvent {
        UserEvent::Registered(UserRegistered {
            id,
            email: Email::parse(email).unwrap(),
            display_name: DisplayName::parse("Ada").unwrap(),
        })
    }

    fn profile(name: Option<&str>, bio: Option<&str>) -> UserCommand {
        UserCommand::UpdateProfile(UpdateProfile {
            display_name: name.map(|name| DisplayName::parse(name).unwrap()),
            bio: bio.map(|bio| Bio::parse(bio).unwrap()),
        })
    }

    #[test]
    fn given_no_history_when_registering_then_user_registered() {
        let id = UserId::new();
        let events = given(&[]).decide(register(id, "ada@example.com")).unwrap();
        assert_eq!(events, vec![registered(id, "ada@example.com")]);
        let state = given(&events);
        assert_eq!(state.status(), Some(AccountStatus::Active));
    }

    #[test]
    fn given_a_registered_or_erased_user_when_registering_again_then_rejected() {
        let id = UserId::new();
        let state = given(&[registered(id, "ada@example.com")]);
        assert_eq!(state.decide(register(id, "other@example.com")), Err(UserError::AlreadyRegistered(id)));
        let erased = given(&[registered(id, "ada@example.com"), UserEvent::PersonalDataErased { id }]);
        assert_eq!(erased.decide(register(id, "other@example.com")), Err(UserError::AlreadyRegistered(id)));
    }

    #[test]
    fn given_a_registered_user_when_updating_the_profile_then_one_event_per_changed_field() {
        let id = UserId::new();
        let state = given(&[registered(id, "ada@example.com")]);
        let events = state.decide(profile(Some("Ada L."), Some("Analyst"))).unwrap();
        assert_eq!(
            events,
            vec![
                UserEvent::DisplayNameChanged(DisplayNameChanged {
                    id,
                    display_name: DisplayName::parse("Ada L.").unwrap()
                }),
                UserEvent::BioChanged(BioChanged { id, bio: Bio::parse("Analyst").unwrap() }),
            ]
        );
        let state = events.iter().fold(state, |state, event| state.evolve(event));
        assert_eq!(state.display_name().unwrap().as_str(), "Ada L.");
        assert_eq!(state.email().unwrap().as_str(), "ada@example.com");
        // Unchanged fields decide nothing.
        assert_eq!(state.decide(profile(Some("Ada L."), Some("Analyst"))), Ok(vec![]));
        assert_eq!(state.decide(profile(None, None)), Ok(vec![]));
    }

    #[test]
    fn given_no_user_when_updating_then_not_registered() {
        assert_eq!(given(&[]).decide(profile(Some("Ada"), None)), Err(UserError::NotRegistered));
    }

    #[test]
    fn an_email_change_moves_the_user_and_the_same_email_is_a_no_op() {
        let id = UserId::new();
        let state = given(&[registered(id, "ada@example.com")]);
        let change = |email: &str| UserCommand::ChangeEmail(ChangeEmail { email: Email::parse(email).unwrap() });
        assert_eq!(state.decide(change("ADA@example.com")), Ok(vec![]));
        let events = state.decide(change("ada@lovelace.org")).unwrap();
        let state = events.iter().fold(state, |state, event| state.evolve(event));
        assert_eq!(state.email().unwrap().as_str(), "ada@lovelace.org");
    }

    #[test]
    fn a_deactivated_user_keeps_their_data_but_cannot_change_it() {
        let id = UserId::new();
        let state = given(&[registered(id, "ada@example.com"), UserEvent::Deactivated { id }]);
        assert_eq!(state.status(), Some(AccountStatus::Deactivated));
        assert_eq!(state.email().unwrap().as_str(), "ada@example.com");
        assert_eq!(state.decide(profile(Some("Eve"), None)), Err(UserError::Deactivated));
        assert_eq!(state.decide(UserCommand::Deactivate), Ok(vec![]));
        assert_eq!(state.decide(UserCommand::ErasePersonalData), Ok(vec![UserEvent::PersonalDataErased { id }]));
    }

    #[test]
    fn erasure_forgets_everything_personal_and_is_final() {
        let id = UserId::new();
        let state = given(&[registered(id, "ada@example.com"), UserEvent::PersonalDataErased { id }]);
        assert_eq!(state, User::Erased { id });
        assert_eq!(state.email(), None);
        assert_eq!(state.decide(UserCommand::ErasePersonalData), Ok(vec![]));
        assert_eq!(state.decide(profile(Some("Ada"), None)), Err(UserError::Erased));
        assert_eq!(state.decide(UserCommand::Deactivate), Err(UserError::Erased));
    }

    #[test]
    fn a_forgotten_event_leaves_the_user_erased() {
        let id = UserId::new();
        let state = given(&[UserEvent::Forgotten { id, event_type: "UserRegistered" }]);
        assert_eq!(state, User::Erased { id });
        assert_eq!(UserEvent::Forgotten { id, event_type: "UserRegistered" }.event_type(), "UserRegistered");
    }
}
