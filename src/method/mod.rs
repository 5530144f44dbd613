//! Method stage: what makes instruction-free tuning (the momentum proxy instruction).

pub mod proxy;
