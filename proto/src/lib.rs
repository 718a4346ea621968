//! gRPC contracts between the gateway and the command services, and the one error-code enum
//! that maps to both gRPC codes and HTTP statuses.

#![forbid(unsafe_code)]

mod error;
pub mod token;

pub use error::ErrorCode;

/// Every Keel gRPC contract, as an encoded `FileDescriptorSet`: what gRPC reflection serves.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/keel_descriptor.bin"));

pub mod common {
    pub mod v1 {
        tonic::include_proto!("keel.common.v1");
    }
}

pub mod identity {
    pub mod v1 {
        tonic::include_proto!("keel.identity.v1");
    }
}

pub mod auth {
    pub mod v1 {
        tonic::include_proto!("keel.auth.v1");
    }
}

pub mod authz {
    pub mod v1 {
        tonic::include_proto!("keel.authz.v1");
    }
}

pub mod blog {
    pub mod v1 {
        tonic::include_proto!("keel.blog.v1");
    }
}
