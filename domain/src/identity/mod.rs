//! The identity context: users.

mod user;
mod values;

pub use user::{RegisterUser, User, UserCommand, UserError, UserEvent, UserRegistered};
pub use values::{DisplayName, Email, InvalidValue, UserId};
