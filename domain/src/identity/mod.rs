//! The identity context: users.

mod user;
mod values;

pub use user::{
    AccountStatus, BioChanged, ChangeEmail, DisplayNameChanged, EmailChanged, RegisterUser, UpdateProfile, User,
    UserCommand, UserError, UserEvent, UserRegistered,
};
pub use values::{Bio, DisplayName, Email, InvalidValue, UserId};
