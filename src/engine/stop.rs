//! `StopStrings`: cuts generated text at the first stop string and holds back any suffix
//! that could still become one, so a client never sees part of a stop string.

/// Stop-string matching over streamed text.
#[derive(Debug, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    pending: String,
}

/// What `StopStrings::push` decided.
#[derive(Debug, PartialEq, Eq)]
pub struct StopCheck {
    /// Text that is final and may be sent.
    pub emit: String,
    /// A stop string was found: generation ends after `emit`.
    pub stopped: bool,
}

impl StopStrings {
    /// Matches any of `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> StopStrings {
        StopStrings {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    /// Adds generated text.
    pub fn push(&mut self, text: &str) -> StopCheck {
        self.pending.push_str(text);
        // The earliest stop string wins; text before it is final.
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let emit = self.pending[..at].to_string();
            self.pending.clear();
            return StopCheck {
                emit,
                stopped: true,
            };
        }
        let hold = self.held_suffix_len();
        let cut = self.pending.len() - hold;
        let emit = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        StopCheck {
            emit,
            stopped: false,
        }
    }

    /// The longest suffix of the pending text that is a proper prefix of a stop string.
    fn held_suffix_len(&self) -> usize {
        let p = &self.pending;
        self.stops
            .iter()
            .flat_map(|s| {
                (1..s.len().min(p.len() + 1))
                    .rev()
                    .filter(|&n| s.is_char_boundary(n) && p.is_char_boundary(p.len() - n))
                    .find(|&n| p.ends_with(&s[..n]))
            })
            .max()
            .unwrap_or(0)
    }

    /// Releases what was held back (generation ended for another reason).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut s = StopStrings::new(&stops);
        let mut out = String::new();
        for p in pieces {
            let c = s.push(p);
            out += &c.emit;
            if c.stopped {
                return (out, true);
            }
        }
        out += &s.flush();
        (out, false)
    }

    #[test]
    fn stop_split_across_pieces_is_never_emitted() {
        let stops = vec!["User:".to_string()];
        let mut s = StopStrings::new(&stops);
        assert_eq!(s.push("Hello Us").emit, "Hello ");
        assert_eq!(
            s.push("er: hi"),
            StopCheck {
                emit: String::new(),
                stopped: true
            }
        );
    }

    #[test]
    fn held_text_that_does_not_match_is_released() {
        assert_eq!(
            run(&["User:"], &["a U", "sb", "c"]),
            ("a Usbc".to_string(), false)
        );
        assert_eq!(run(&["ab", "b"], &["xab"]), ("x".to_string(), true));
        assert_eq!(
            run(&["日本"], &["こんに日", "本"]),
            ("こんに".to_string(), true)
        );
    }
}
