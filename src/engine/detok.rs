//! `Detokenizer`: turns a growing list of token ids into text pieces as they become final.
//! It decodes a small window (from the last emitted boundary) and emits only text that can
//! no longer change: never a trailing U+FFFD from a UTF-8 sequence split across tokens, so
//! Japanese and emoji stream whole, and the concatenated pieces equal decoding at once.

use crate::model::Tokenizer;

use super::error::InferenceError;

/// Incremental, UTF-8-safe decoding of one sequence's new tokens.
pub struct Detokenizer<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    /// Start of the decode window (a boundary already emitted up to `cur`).
    prev: usize,
    /// End of what has been emitted.
    cur: usize,
    skip_special: bool,
}

impl<'a> Detokenizer<'a> {
    /// A detokenizer; `skip_special` drops special tokens from the text.
    pub fn new(tok: &'a Tokenizer, skip_special: bool) -> Detokenizer<'a> {
        Detokenizer {
            tok,
            ids: Vec::new(),
            prev: 0,
            cur: 0,
            skip_special,
        }
    }

    fn decode(&self, ids: &[u32]) -> Result<String, InferenceError> {
        self.tok
            .decode(ids, self.skip_special)
            .map_err(InferenceError::Decode)
    }

    /// Adds a token; returns the text that became final, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>, InferenceError> {
        self.ids.push(id);
        let prev_text = self.decode(&self.ids[self.prev..self.cur])?;
        let text = self.decode(&self.ids[self.prev..])?;
        if text.len() > prev_text.len() && !text.ends_with('\u{FFFD}') {
            if let Some(new) = text.get(prev_text.len()..) {
                let new = new.to_string();
                self.prev = self.cur;
                self.cur = self.ids.len();
                return Ok(Some(new));
            }
        }
        Ok(None)
    }

    /// Emits whatever is still held back (at the end of generation).
    pub fn flush(&mut self) -> Result<Option<String>, InferenceError> {
        let prev_text = self.decode(&self.ids[self.prev..self.cur])?;
        let text = self.decode(&self.ids[self.prev..])?;
        self.prev = self.cur;
        self.cur = self.ids.len();
        Ok(text
            .get(prev_text.len()..)
            .filter(|s| !s.is_empty())
            .map(str::to_string))
    }

    /// Every token pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}
