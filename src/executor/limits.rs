//! The executor's view of resource limits and bounded durations: they live in
//! [`crate::units`], below the settings that parse them too.

pub use crate::units::*;
