//! The User aggregate.

use crate::{Aggregate, DomainEvent};

use super::{DisplayName, Email, UserId};

/// Register a new user. `email_owner` is the user that already holds the email, looked up by the
/// command service before deciding; uniqueness is a fact about all users, not about this one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterUser {
    pub id: UserId,
    pub email: Email,
    pub display_name: DisplayName,
    pub email_owner: Option<UserId>,
}

/// Change a registered user's display name. Changing it to the name it already has decides no
/// event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeDisplayName {
    pub display_name: DisplayName,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserCommand {
    Register(RegisterUser),
    ChangeDisplayName(ChangeDisplayName),
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
pub enum UserEvent {
    Registered(UserRegistered),
    DisplayNameChanged(DisplayNameChanged),
}

impl DomainEvent for UserEvent {
    fn event_type(&self) -> &'static str {
        match self {
            Self::Registered(_) => "UserRegistered",
            Self::DisplayNameChanged(_) => "UserDisplayNameChanged",
        }
    }

    fn schema_version(&self) -> u32 {
        match self {
            Self::Registered(_) | Self::DisplayNameChanged(_) => 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    #[error("user {0} is already registered")]
    AlreadyRegistered(UserId),
    #[error("the email address is already registered")]
    EmailTaken,
    #[error("no such user")]
    NotRegistered,
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
    },
}

impl User {
    pub fn email(&self) -> Option<&Email> {
        match self {
            Self::Unregistered => None,
            Self::Registered { email, .. } => Some(email),
        }
    }

    pub fn display_name(&self) -> Option<&DisplayName> {
        match self {
            Self::Unregistered => None,
            Self::Registered { display_name, .. } => Some(display_name),
        }
    }
}

impl Aggregate for User {
    type Command = UserCommand;
    type Event = UserEvent;
    type Error = UserError;

    fn decide(&self, command: UserCommand) -> Result<Vec<UserEvent>, UserError> {
        match command {
            UserCommand::Register(register) => {
                if let Self::Registered { id, .. } = self {
                    return Err(UserError::AlreadyRegistered(*id));
                }
                if register.email_owner.is_some_and(|owner| owner != register.id) {
                    return Err(UserError::EmailTaken);
                }
                Ok(vec![UserEvent::Registered(UserRegistered {
                    id: register.id,
                    email: register.email,
                    display_name: register.display_name,
                })])
            }
            UserCommand::ChangeDisplayName(change) => match self {
                Self::Unregistered => Err(UserError::NotRegistered),
                Self::Registered { display_name, .. } if *display_name == change.display_name => Ok(vec![]),
                Self::Registered { id, .. } => Ok(vec![UserEvent::DisplayNameChanged(DisplayNameChanged {
                    id: *id,
                    display_name: change.display_name,
                })]),
            },
        }
    }

    fn evolve(self, event: &UserEvent) -> Self {
        match event {
            UserEvent::Registered(registered) => Self::Registered {
                id: registered.id,
                email: registered.email.clone(),
                display_name: registered.display_name.clone(),
            },
            UserEvent::DisplayNameChanged(changed) => match self {
                Self::Registered { id, email, .. } => {
                    Self::Registered { id, email, display_name: changed.display_name.clone() }
                }
                // Events come from valid commits only, and a change is decided against a
                // registered user; an unregistered user stays as it is.
                unregistered @ Self::Unregistered => unregistered,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn given(events: &[UserEvent]) -> User {
        events.iter().fold(User::default(), |state, event| state.evolve(event))
    }

    fn register(id: UserId, email: &str, owner: Option<UserId>) -> UserCommand {
        UserCommand::Register(RegisterUser {
            id,
            email: Email::parse(email).unwrap(),
            display_name: DisplayName::parse("Ada").unwrap(),
            email_owner: owner,
        })
    }

    fn registered(id: UserId, email: &str) -> UserEvent {
        UserEvent::Registered(UserRegistered {
            id,
            email: Email::parse(email).unwrap(),
            display_name: DisplayName::parse("Ada").unwrap(),
        })
    }

    #[test]
    fn given_no_history_when_registering_then_user_registered() {
        let id = UserId::new();
        let events = given(&[]).decide(register(id, "ada@example.com", None)).unwrap();
        assert_eq!(events, vec![registered(id, "ada@example.com")]);
    }

    #[test]
    fn given_a_registered_user_when_registering_again_then_rejected() {
        let id = UserId::new();
        let state = given(&[registered(id, "ada@example.com")]);
        assert_eq!(state.decide(register(id, "other@example.com", None)), Err(UserError::AlreadyRegistered(id)));
    }

    #[test]
    fn given_the_email_held_by_another_user_when_registering_then_email_taken() {
        let result = given(&[]).decide(register(UserId::new(), "ada@example.com", Some(UserId::new())));
        assert_eq!(result, Err(UserError::EmailTaken));
    }

    fn change(name: &str) -> UserCommand {
        UserCommand::ChangeDisplayName(ChangeDisplayName { display_name: DisplayName::parse(name).unwrap() })
    }

    #[test]
    fn given_a_registered_user_when_changing_the_display_name_then_display_name_changed() {
        let id = UserId::new();
        let state = given(&[registered(id, "ada@example.com")]);
        let events = state.decide(change("Ada L.")).unwrap();
        assert_eq!(
            events,
            vec![UserEvent::DisplayNameChanged(DisplayNameChanged {
                id,
                display_name: DisplayName::parse("Ada L.").unwrap()
            })]
        );
        let state = events.iter().fold(state, |state, event| state.evolve(event));
        assert_eq!(state.display_name().unwrap().as_str(), "Ada L.");
        assert_eq!(state.email().unwrap().as_str(), "ada@example.com");
    }

    #[test]
    fn given_the_same_display_name_when_changing_then_no_event() {
        let state = given(&[registered(UserId::new(), "ada@example.com")]);
        assert_eq!(state.decide(change("Ada")), Ok(vec![]));
    }

    #[test]
    fn given_no_user_when_changing_the_display_name_then_not_registered() {
        assert_eq!(given(&[]).decide(change("Ada")), Err(UserError::NotRegistered));
    }

    #[test]
    fn evolve_records_the_registration() {
        let id = UserId::new();
        let state = given(&[registered(id, "Ada@Example.com")]);
        assert_eq!(state.email().unwrap().as_str(), "ada@example.com");
        assert_eq!(registered(id, "a@b.co").event_type(), "UserRegistered");
    }
}
