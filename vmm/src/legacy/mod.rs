//! The legacy PC devices the VMM emulates itself: the 8250 serial port (console) and the
//! i8042 controller (only for its reset line, which is how the guest reboots or powers off).

pub mod i8042;
pub mod serial;

pub use i8042::ResetPort;
pub use serial::SerialPort;
