//! A slab: values at stable indices, reused after removal; what the
//! io_uring and UDP workers keep their connections, listeners and flows in.

/// A slab: stable indices, reused after removal.
pub(crate) struct Slab<T> {
    items: Vec<Option<T>>,
    free: Vec<usize>,
}

impl<T> Slab<T> {
    pub(crate) fn new() -> Slab<T> {
        Slab {
            items: Vec::new(),
            free: Vec::new(),
        }
    }

    pub(crate) fn insert(&mut self, item: T) -> usize {
        if let Some(i) = self.free.pop() {
            self.items[i] = Some(item);
            i
        } else {
            self.items.push(Some(item));
            self.items.len() - 1
        }
    }

    pub(crate) fn get(&mut self, i: usize) -> Option<&mut T> {
        self.items.get_mut(i).and_then(Option::as_mut)
    }

    /// The value at `i`, if any, read-only.
    pub(crate) fn peek(&self, i: usize) -> Option<&T> {
        self.items.get(i).and_then(Option::as_ref)
    }

    /// Slots, used or free: every index in use is below it.
    pub(crate) fn capacity(&self) -> usize {
        self.items.len()
    }

    pub(crate) fn remove(&mut self, i: usize) -> Option<T> {
        let item = self.items.get_mut(i).and_then(Option::take);
        if item.is_some() {
            self.free.push(i);
        }
        item
    }

    /// Values in it.
    pub(crate) fn len(&self) -> usize {
        self.items.len() - self.free.len()
    }

    /// Gives its memory back once it is empty and was large (a burst of
    /// flows that all ended).
    pub(crate) fn shrink_if_empty(&mut self) {
        if self.len() == 0 && self.items.capacity() > 1024 {
            self.items = Vec::new();
            self.free = Vec::new();
        }
    }

    /// The indices in use.
    pub(crate) fn indices(&self) -> impl Iterator<Item = usize> + '_ {
        self.items
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_some())
            .map(|(i, _)| i)
    }
}
