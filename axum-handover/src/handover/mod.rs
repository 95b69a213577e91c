//! The handover between two generations: [`spawn`] is the old process's
//! side, [`join`] the new one's, [`channel`] the messages between them,
//! [`state`] the app's own state that crosses it.

pub(crate) mod channel;
pub(crate) mod join;
pub(crate) mod spawn;
pub(crate) mod state;
