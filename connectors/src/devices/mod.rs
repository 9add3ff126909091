//! Device types. Each is one module with a unit struct implementing [`Device`]; a stage a
//! type does not override runs the default behaviour in [`crate::stages`].
//!
//! Adding a type: write `devices/<name>.rs` and add one line to `device_types!` below.

use crate::context::Ctx;
use crate::error::Result;
use crate::stage::Stage;
use crate::stages;

/// One device type's stages. Each returns the stage's exit code, or an error
/// (exit 1, or 46 for [`crate::ConnectorError::Recovery`]).
// Stages run on the connector's own runtime and are never spawned, so the futures need
// no `Send` bound; the trait is public for documentation, not for outside implementors.
#[allow(async_fn_in_trait)]
pub trait Device {
    async fn provision(&self, ctx: &Ctx) -> Result<i32> {
        stages::provision(ctx).await
    }
    async fn firmware_update(&self, ctx: &Ctx) -> Result<i32> {
        stages::firmware_update(ctx).await
    }
    async fn runtest(&self, ctx: &Ctx) -> Result<i32> {
        stages::runtest(ctx, &[]).await
    }
    async fn allocate(&self, ctx: &Ctx) -> Result<i32> {
        stages::allocate(ctx).await
    }
    async fn reserve(&self, ctx: &Ctx) -> Result<i32> {
        crate::reserve::reserve(ctx).await
    }
    async fn cleanup(&self, ctx: &Ctx) -> Result<i32> {
        stages::cleanup(ctx).await
    }
}

async fn run_stage<D: Device>(device: &D, stage: Stage, ctx: &Ctx) -> Result<i32> {
    match stage {
        Stage::Provision => device.provision(ctx).await,
        Stage::FirmwareUpdate => device.firmware_update(ctx).await,
        Stage::RunTest => device.runtest(ctx).await,
        Stage::Allocate => device.allocate(ctx).await,
        Stage::Reserve => device.reserve(ctx).await,
        Stage::Cleanup => {
            // Keys a reservation recorded and could not remove (cut short) go first,
            // while the device is still there; the type's own cleanup runs regardless.
            let keys = crate::reserve::remove_recorded_keys(ctx).await;
            let code = device.cleanup(ctx).await?;
            keys?;
            Ok(code)
        }
    }
}

/// Declares the modules, the [`DeviceType`] enum, its names and its dispatch.
macro_rules! device_types {
    ($($variant:ident => $module:ident::$ty:ident [$canonical:literal $(, $alias:literal)*];)+) => {
        $(pub mod $module;)+

        /// The registered device types.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum DeviceType {
            $($variant),+
        }

        impl DeviceType {
            /// Every accepted name, aliases included.
            pub const NAMES: &'static [&'static str] = &[$($canonical $(, $alias)*),+];

            pub fn from_name(name: &str) -> Option<DeviceType> {
                match name {
                    $($canonical $(| $alias)* => Some(DeviceType::$variant),)+
                    _ => None,
                }
            }

            /// The canonical name.
            pub fn name(self) -> &'static str {
                match self {
                    $(DeviceType::$variant => $canonical),+
                }
            }

            pub async fn run(self, stage: Stage, ctx: &Ctx) -> Result<i32> {
                match self {
                    $(DeviceType::$variant => run_stage(&$module::$ty, stage, ctx).await),+
                }
            }
        }
    };
}

device_types! {
    Fake => fake::Fake ["fake", "fake_connector"];
    NoProvision => noprovision::NoProvision ["noprovision"];
    Multi => multi::Multi ["multi"];
    Qemu => qemu::Qemu ["qemu"];
}
