//! Train stage: optimizer and schedules, the training loop, checkpoints, metrics.

pub mod checkpoint;
pub mod distributed;
pub mod lock;
pub mod metrics;
pub mod optim;
pub mod plan;
pub mod recipe;
pub mod schedule;
pub mod trainer;
