//! Stop strings: a reply ends before the first one it contains.

/// Passes a reply's text through, holding back any tail that could begin a
/// stop string until the next piece settles it.
#[derive(Debug, Default)]
pub(crate) struct StopScanner {
    stops: Vec<String>,
    held: String,
}

impl StopScanner {
    pub fn new(stops: Vec<String>) -> StopScanner {
        StopScanner {
            stops,
            held: String::new(),
        }
    }

    /// Adds `piece`; returns the text now safe to send, and whether a stop
    /// string was reached (the text from it on is dropped).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        self.held.push_str(piece);
        let first_stop = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first_stop {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        let keep = self.undecided_tail();
        let out = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        (out, false)
    }

    /// The text still held back, at the end of the reply.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Bytes at the end of the held text that begin some stop string.
    fn undecided_tail(&self) -> usize {
        let held = &self.held;
        (0..held.len())
            .filter(|&i| held.is_char_boundary(i))
            .find(|&i| self.stops.iter().any(|s| s.starts_with(&held[i..])))
            .map_or(0, |i| held.len() - i)
    }
}

#[cfg(test)]
mod tests {
    use super::StopScanner;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut s = StopScanner::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (text, stopped) = s.push(p);
            out.push_str(&text);
            if stopped {
                return (out, true);
            }
        }
        out.push_str(&s.finish());
        (out, false)
    }

    #[test]
    fn a_stop_string_split_across_pieces_ends_the_text_before_it() {
        assert_eq!(
            run(&["\n\n"], &["one", "\n", "\ntwo"]),
            ("one".to_string(), true)
        );
        assert_eq!(
            run(&["END", "x"], &["aE", "N", "D b"]),
            ("a".to_string(), true)
        );
    }

    #[test]
    fn a_tail_that_only_begins_a_stop_string_is_sent_in_the_end() {
        assert_eq!(
            run(&["END"], &["and E", "N"]),
            ("and EN".to_string(), false)
        );
        assert_eq!(run(&[], &["é", "ü"]), ("éü".to_string(), false));
        assert_eq!(run(&["ü!"], &["éü"]), ("éü".to_string(), false));
    }

    #[test]
    fn text_is_held_back_only_while_it_may_begin_a_stop_string() {
        let mut s = StopScanner::new(vec!["STOP".into()]);
        assert_eq!(s.push("a S"), ("a ".to_string(), false));
        assert_eq!(s.push("x"), ("Sx".to_string(), false));
    }
}
