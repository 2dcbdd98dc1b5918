//! Tool-call id → the exact DSML block the model sampled for it. When a client sends the
//! conversation back, an assistant message whose call ids all map to one block is rendered
//! with that block byte for byte, so the prompt matches the live session's tokens and only
//! the new suffix is prefilled (ds4-spec §4, "Exact replay").

use std::collections::{HashMap, VecDeque};

/// ds4's `--tool-memory-max-ids` default.
pub const DEFAULT_MAX_IDS: usize = 100_000;

/// A bounded map; the oldest ids are forgotten first.
#[derive(Debug)]
pub struct ToolMemory {
    blocks: HashMap<String, String>,
    order: VecDeque<String>,
    max_ids: usize,
}

impl ToolMemory {
    pub fn new(max_ids: usize) -> Self {
        ToolMemory {
            blocks: HashMap::new(),
            order: VecDeque::new(),
            max_ids,
        }
    }

    pub fn insert(&mut self, id: String, raw_dsml: String) {
        if self.max_ids == 0 {
            return;
        }
        if self.blocks.insert(id.clone(), raw_dsml).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > self.max_ids {
            if let Some(old) = self.order.pop_front() {
                self.blocks.remove(&old);
            }
        }
    }

    pub fn get(&self, id: &str) -> Option<&str> {
        self.blocks.get(id).map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::ToolMemory;

    #[test]
    fn oldest_ids_are_evicted_past_the_limit() {
        let mut m = ToolMemory::new(2);
        m.insert("a".into(), "A".into());
        m.insert("b".into(), "B".into());
        m.insert("a".into(), "A2".into());
        assert_eq!(m.get("a"), Some("A2"));
        m.insert("c".into(), "C".into());
        assert_eq!(m.get("a"), None);
        assert_eq!((m.get("b"), m.get("c"), m.len()), (Some("B"), Some("C"), 2));
    }
}
