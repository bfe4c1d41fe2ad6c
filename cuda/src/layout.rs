//! Host-side bookkeeping of one layer's window on the device: rows held,
//! capacity, and the moves that taking or discarding rows implies. Plain
//! Rust, so it is tested without a GPU.

use tandem_gpu::DeviceError;

/// Rows a layer's arrays hold at least once they exist.
const MIN_CAPACITY: usize = 256;

/// Rows held and allocated by one layer's key and value arrays (rows of
/// `n_kv_heads × head_dim` bf16, row-major, so any run of rows is contiguous).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WindowLayout {
    len: usize,
    capacity: usize,
}

/// Rows `from` move down to start at row `to` (after a removal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shift {
    /// The rows that move.
    pub from: std::ops::Range<usize>,
    /// Where the first of them lands.
    pub to: usize,
}

impl Shift {
    /// Whether source and destination overlap (the copy needs a staging buffer).
    pub fn overlaps(&self) -> bool {
        self.to + self.from.len() > self.from.start
    }
}

impl WindowLayout {
    /// Rows held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no row is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Rows allocated.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Makes room for `extra` more rows: the new capacity when the arrays must
    /// grow (the held rows then copy into the new arrays), else `None`.
    pub fn reserve(&mut self, extra: usize) -> Option<usize> {
        let needed = self.len + extra;
        if needed <= self.capacity {
            return None;
        }
        // A quarter more: a long dense context's arrays are GPU memory's largest users.
        self.capacity = needed
            .max(self.capacity + self.capacity / 4)
            .max(MIN_CAPACITY);
        Some(self.capacity)
    }

    /// Records `rows` appended rows (after [`WindowLayout::reserve`]).
    pub fn push(&mut self, rows: usize) {
        debug_assert!(self.len + rows <= self.capacity);
        self.len += rows;
    }

    /// Removes rows `start..start + count`: the later rows' move, if any.
    pub fn remove(&mut self, start: usize, count: usize) -> Result<Option<Shift>, DeviceError> {
        let end = start
            .checked_add(count)
            .filter(|&end| end <= self.len)
            .ok_or_else(|| {
                DeviceError::Shape(format!(
                    "rows {start}..+{count} of a window of {}",
                    self.len
                ))
            })?;
        let shift = (count > 0 && end < self.len).then_some(Shift {
            from: end..self.len,
            to: start,
        });
        self.len -= count;
        Ok(shift)
    }

    /// Keeps the first `len` rows (no copy).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// After a bulk move out (a context offloaded to the CPU workers), a
    /// smaller capacity to move the held rows into, giving the memory back;
    /// `None` while the arrays are at most four times what they hold.
    pub fn shrink(&mut self) -> Option<usize> {
        let target = (2 * self.len).max(MIN_CAPACITY);
        if self.capacity <= 2 * target {
            return None;
        }
        self.capacity = target;
        Some(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_adds_a_quarter_from_a_floor_and_only_when_needed() {
        let mut w = WindowLayout::default();
        assert_eq!(w.reserve(3), Some(MIN_CAPACITY));
        w.push(3);
        assert_eq!(w.reserve(MIN_CAPACITY - 3), None);
        w.push(MIN_CAPACITY - 3);
        assert_eq!(w.reserve(1), Some(MIN_CAPACITY * 5 / 4));
        assert_eq!(w.reserve(5 * MIN_CAPACITY), Some(6 * MIN_CAPACITY));
        assert_eq!(w.len(), MIN_CAPACITY);
    }

    #[test]
    fn removal_moves_the_later_rows_down() {
        let mut w = WindowLayout::default();
        w.reserve(10);
        w.push(10);
        let shift = w.remove(2, 3).expect("remove").expect("a move");
        assert_eq!(shift, Shift { from: 5..10, to: 2 });
        assert!(shift.overlaps());
        assert_eq!(w.len(), 7);
        let shift = w.remove(0, 4).expect("remove").expect("a move");
        assert_eq!(shift, Shift { from: 4..7, to: 0 });
        assert!(!shift.overlaps());
        assert_eq!(w.remove(1, 2).expect("remove the tail"), None);
        assert_eq!(w.len(), 1);
        assert!(w.remove(1, 1).is_err());
        assert!(w.remove(usize::MAX, 2).is_err());
        w.truncate(5);
        assert_eq!(w.len(), 1);
        w.truncate(0);
        assert!(w.is_empty());
    }

    #[test]
    fn a_bulk_move_out_gives_memory_back_but_one_evicted_row_does_not() {
        let mut w = WindowLayout::default();
        w.reserve(10_000);
        w.push(10_000);
        w.remove(5, 1).expect("remove");
        assert_eq!(w.shrink(), None);
        w.remove(4, 9_900).expect("remove");
        assert_eq!(w.shrink(), Some(MIN_CAPACITY));
        assert_eq!((w.len(), w.capacity()), (99, MIN_CAPACITY));
        assert_eq!(w.shrink(), None);
        assert_eq!(w.reserve(MIN_CAPACITY - 99), None);
    }
}
