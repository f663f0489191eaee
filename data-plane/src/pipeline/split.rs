//! Splitting a reply into chunks a channel accepts: at a paragraph break if one is near the
//! limit, else at a sentence end, else between words, else anywhere (on a character boundary).

/// Chunks of at most `limit` characters, trimmed, none empty.
pub fn split(text: &str, limit: usize) -> Vec<String> {
    let limit = limit.max(1);
    let mut chunks = Vec::new();
    let mut rest = text.trim();
    while rest.chars().count() > limit {
        // Byte offset just past the first `limit` characters.
        let window_end = rest.char_indices().nth(limit).map_or(rest.len(), |(i, _)| i);
        let window = &rest[..window_end];
        // Prefer boundaries in the second half of the window, so chunks stay reasonably full.
        let half = window.char_indices().nth(limit / 2).map_or(0, |(i, _)| i);
        let cut = last_boundary(window, half, &["\n\n"])
            .or_else(|| last_boundary(window, half, &[". ", "! ", "? ", ".\n", "!\n", "?\n", "\n"]))
            .or_else(|| last_boundary(window, half, &[" "]))
            .unwrap_or(window_end);
        let chunk = rest[..cut].trim();
        if !chunk.is_empty() {
            chunks.push(chunk.to_owned());
        }
        rest = rest[cut..].trim_start();
    }
    if !rest.is_empty() {
        chunks.push(rest.to_owned());
    }
    chunks
}

/// Room kept in each chunk for a closing fence and a reopened one with its language.
const FENCE_RESERVE: usize = 24;
const MAX_FENCE_LANGUAGE: usize = 16;

/// For channels that render Markdown code blocks (Discord): chunks of at most `limit`
/// characters cut at line ends, so code keeps its indentation; a code block cut between chunks
/// is closed at the end of one and opened again, with its language, at the start of the next.
/// A line longer than a chunk is cut between words (prose) or anywhere (code).
pub fn split_code_aware(text: &str, limit: usize) -> Vec<String> {
    let text = text.trim();
    if text.chars().count() <= limit {
        return if text.is_empty() { Vec::new() } else { vec![text.to_owned()] };
    }
    let mut chunks = FencedChunks { budget: limit.saturating_sub(FENCE_RESERVE).max(1), ..Default::default() };
    for line in text.split_inclusive('\n') {
        let fence = line.trim_start().starts_with("```") && line.matches("```").count() % 2 == 1;
        if fence || line.chars().count() <= chunks.budget {
            chunks.push(line);
        } else if chunks.open.is_some() {
            let chars: Vec<char> = line.chars().collect();
            for piece in chars.chunks(chunks.budget) {
                chunks.push(&piece.iter().collect::<String>());
            }
        } else {
            let pieces = split(line, chunks.budget);
            let last = pieces.len().saturating_sub(1);
            for (i, piece) in pieces.iter().enumerate() {
                chunks.push(piece);
                chunks.push(if i == last && line.ends_with('\n') { "\n" } else { " " });
            }
        }
        if fence {
            chunks.open = match chunks.open {
                Some(_) => None,
                None => {
                    let language = line.trim().trim_start_matches('`').trim();
                    Some(if language.len() <= MAX_FENCE_LANGUAGE && !language.contains('`') {
                        language.to_owned()
                    } else {
                        String::new()
                    })
                }
            };
        }
    }
    chunks.flush();
    chunks.done
}

/// Chunks being filled line by line, knowing whether a code block is open.
#[derive(Default)]
struct FencedChunks {
    budget: usize,
    done: Vec<String>,
    lines: String,
    chars: usize,
    /// The language of the code block the current chunk starts inside of, if it does.
    starts_in: Option<String>,
    /// The language of the code block open after the lines so far, if one is.
    open: Option<String>,
}

impl FencedChunks {
    fn push(&mut self, piece: &str) {
        let n = piece.chars().count();
        if self.chars + n > self.budget && self.chars > 0 {
            self.flush();
        }
        self.lines.push_str(piece);
        self.chars += n;
    }

    fn flush(&mut self) {
        // Inside code, leading whitespace is indentation: keep it.
        let body = if self.starts_in.is_some() { self.lines.trim_end() } else { self.lines.trim() };
        if !body.is_empty() {
            let mut chunk = String::with_capacity(body.len() + FENCE_RESERVE);
            if let Some(language) = &self.starts_in {
                chunk.push_str("```");
                chunk.push_str(language);
                chunk.push('\n');
            }
            chunk.push_str(body);
            if self.open.is_some() {
                chunk.push_str("\n```");
            }
            self.done.push(chunk);
        }
        self.lines.clear();
        self.chars = 0;
        self.starts_in = self.open.clone();
    }
}

/// The byte offset just after the last of `separators` that ends at or after `from`.
fn last_boundary(window: &str, from: usize, separators: &[&str]) -> Option<usize> {
    separators
        .iter()
        .filter_map(|sep| window.rfind(sep).map(|i| i + sep.len()))
        .filter(|&end| end > from && end <= window.len())
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_fences_stay_balanced_across_chunks() {
        let code: String = (0..120).map(|i| format!("let line_{i} = {i};\n")).collect();
        let text = format!("Here is the code:\n\n```rust\n{code}```\n\nThat is all.");
        let chunks = split_code_aware(&text, 500);
        assert!(chunks.len() > 3, "{}", chunks.len());
        for chunk in &chunks {
            assert!(chunk.chars().count() <= 500, "{} characters", chunk.chars().count());
            assert_eq!(chunk.matches("```").count() % 2, 0, "unbalanced chunk: {chunk}");
        }
        assert!(chunks[1].starts_with("```rust\n"), "reopened with its language: {}", chunks[1]);
        let rejoined: String = chunks.concat();
        assert_eq!(rejoined.matches("let line_").count(), 120, "no code lost");
        assert_eq!(split_code_aware("short ```x``` text", 2000), vec!["short ```x``` text".to_owned()]);
    }

    #[test]
    fn code_keeps_its_indentation_and_long_lines_are_cut() {
        let code: String = (0..60).map(|i| format!("def f{i}():\n    return {i}\n")).collect();
        let long_line = "x".repeat(700);
        let text = format!("```python\n{code}{long_line}\n```\nAfter the code, {}.", "some words ".repeat(80).trim());
        let chunks = split_code_aware(&text, 300);
        for chunk in &chunks {
            assert!(chunk.chars().count() <= 300, "{} characters", chunk.chars().count());
            assert_eq!(chunk.matches("```").count() % 2, 0, "unbalanced chunk: {chunk}");
            for line in chunk.lines().filter(|l| l.contains("return")) {
                assert!(line.starts_with("    return"), "indentation lost: {line:?}");
            }
        }
        let all = chunks.concat();
        assert_eq!(all.matches('x').count(), 700, "the long line is all there");
        assert_eq!(all.matches("return").count(), 60);
        assert!(chunks.last().unwrap().ends_with("some words."), "{:?}", chunks.last());
    }

    #[test]
    fn short_text_is_one_chunk() {
        assert_eq!(split("  hello  ", 4000), ["hello"]);
        assert!(split("   ", 10).is_empty());
    }

    #[test]
    fn paragraphs_first() {
        let text = format!("{}\n\n{}", "a".repeat(30), "b".repeat(30));
        assert_eq!(split(&text, 40), ["a".repeat(30), "b".repeat(30)]);
    }

    #[test]
    fn then_sentences_then_words() {
        let text = "One sentence here. Another sentence follows it. And a third one.";
        let chunks = split(text, 30);
        assert_eq!(chunks, ["One sentence here.", "Another sentence follows it.", "And a third one."]);
        let chunks = split("alpha beta gamma delta epsilon", 12);
        assert_eq!(chunks, ["alpha beta", "gamma delta", "epsilon"]);
    }

    #[test]
    fn hard_cut_respects_characters() {
        let text = "é".repeat(25);
        let chunks = split(&text, 10);
        assert_eq!(chunks.iter().map(|c| c.chars().count()).collect::<Vec<_>>(), [10, 10, 5]);
    }

    #[test]
    fn nothing_is_lost_and_no_chunk_exceeds_the_limit() {
        let text = "Lorem ipsum dolor sit amet. ".repeat(300) + &"\n\nx".repeat(50);
        for limit in [50, 100, 4000] {
            let chunks = split(&text, limit);
            assert!(chunks.iter().all(|c| c.chars().count() <= limit && !c.is_empty()));
            let joined: String = chunks.concat().split_whitespace().collect();
            let original: String = text.split_whitespace().collect();
            assert_eq!(joined, original, "limit {limit}");
        }
    }
}
