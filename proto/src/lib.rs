//! gRPC contracts between the gateway and the command services, and the one error-code enum
//! that maps to both gRPC codes and HTTP statuses.

#![forbid(unsafe_code)]

mod error;

pub use error::ErrorCode;

pub mod identity {
    pub mod v1 {
        tonic::include_proto!("keel.identity.v1");
    }
}
