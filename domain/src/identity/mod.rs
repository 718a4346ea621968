//! The identity context: users.

mod user;
mod values;

pub use user::{
    ChangeDisplayName, DisplayNameChanged, RegisterUser, User, UserCommand, UserError, UserEvent, UserRegistered,
};
pub use values::{DisplayName, Email, InvalidValue, UserId};
