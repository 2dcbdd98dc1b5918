//! Tool-call id → the exact DSML block the model sampled for it (and the reasoning before it). When a client sends the
//! conversation back, an assistant message whose call ids all map to one block is rendered
//! with that block byte for byte, so the prompt matches the live session's tokens and only
//! the new suffix is prefilled (ds4-spec §4, "Exact replay").

use std::collections::{HashMap, VecDeque};

/// ds4's `--tool-memory-max-ids` default.
pub const DEFAULT_MAX_IDS: usize = 100_000;

/// What was sampled for one tool call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RememberedCall {
    /// The whole tool-call block, from its leading "\n\n".
    pub raw_dsml: String,
    /// The turn's reasoning, for clients that do not send it back (thinking mode).
    pub reasoning: Option<String>,
}

/// A bounded map; the oldest ids are forgotten first.
#[derive(Debug)]
pub struct ToolMemory {
    blocks: HashMap<String, RememberedCall>,
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

    pub fn insert(&mut self, id: String, call: RememberedCall) {
        if self.max_ids == 0 {
            return;
        }
        if self.blocks.insert(id.clone(), call).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > self.max_ids {
            if let Some(old) = self.order.pop_front() {
                self.blocks.remove(&old);
            }
        }
    }

    pub fn get(&self, id: &str) -> Option<&RememberedCall> {
        self.blocks.get(id)
    }

    /// Every remembered id and call (kv_disk: the tool map saved with a checkpoint).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &RememberedCall)> {
        self.blocks.iter().map(|(id, call)| (id.as_str(), call))
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
    use super::{RememberedCall, ToolMemory};

    fn call(raw: &str) -> RememberedCall {
        RememberedCall {
            raw_dsml: raw.into(),
            reasoning: None,
        }
    }

    #[test]
    fn oldest_ids_are_evicted_past_the_limit() {
        let mut m = ToolMemory::new(2);
        m.insert("a".into(), call("A"));
        m.insert("b".into(), call("B"));
        m.insert("a".into(), call("A2"));
        assert_eq!(m.get("a"), Some(&call("A2")));
        m.insert("c".into(), call("C"));
        assert_eq!(m.get("a"), None);
        assert_eq!(
            (m.get("b"), m.get("c"), m.len()),
            (Some(&call("B")), Some(&call("C")), 2)
        );
    }
}
