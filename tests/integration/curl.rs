//! curl as an independent client of the emulated provider.
