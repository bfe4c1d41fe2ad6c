//! Read-only values (hyperplanes, `ln u` tables) shared by every store with
//! the same parameters while any of them holds one.

use std::sync::{Arc, Mutex, OnceLock, Weak};

/// Values shared while any store holds them, by key.
pub(crate) type SharedCache<K, T> = OnceLock<Mutex<Vec<(K, Weak<T>)>>>;

/// The live value for `key` in `cache`, or a new one from `make`.
pub(crate) fn shared<K: PartialEq, T, E>(
    cache: &SharedCache<K, T>,
    key: K,
    make: impl FnOnce() -> Result<T, E>,
) -> Result<Arc<T>, E> {
    let mut cache = cache
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    cache.retain(|(_, w)| w.strong_count() > 0);
    if let Some(p) = cache
        .iter()
        .find(|(k, _)| *k == key)
        .and_then(|(_, w)| w.upgrade())
    {
        return Ok(p);
    }
    let p = Arc::new(make()?);
    cache.push((key, Arc::downgrade(&p)));
    Ok(p)
}
