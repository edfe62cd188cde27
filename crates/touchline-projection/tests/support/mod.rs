//! Shared by the store tests.

use touchline_projection::SledStore;

/// Opens the store in `path`, waiting for an instance dropped just before to let go of it: sled
/// releases its file lock from a background thread, which can lag on a loaded machine.
///
/// # Panics
/// When the store does not open within 30 s.
#[must_use]
pub fn open_when_released(path: &std::path::Path) -> SledStore {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match SledStore::open(path) {
            Ok(store) => return store,
            Err(error) if std::time::Instant::now() < deadline => {
                eprintln!("store not yet released: {error}");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(error) => panic!("the store does not open: {error}"),
        }
    }
}
