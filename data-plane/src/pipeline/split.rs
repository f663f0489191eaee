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

/// Like [`split`], but a code block cut between chunks is closed at the end of one and opened
/// again (same language) at the start of the next, so each chunk renders on its own.
pub fn split_code_aware(text: &str, limit: usize) -> Vec<String> {
    let text = text.trim();
    if text.chars().count() <= limit {
        return if text.is_empty() { Vec::new() } else { vec![text.to_owned()] };
    }
    let mut open: Option<&str> = None;
    split(text, limit.saturating_sub(FENCE_RESERVE).max(1))
        .iter()
        .map(|piece| {
            let mut chunk = String::with_capacity(piece.len() + FENCE_RESERVE);
            if let Some(language) = open {
                chunk.push_str("```");
                chunk.push_str(language);
                chunk.push('\n');
            }
            chunk.push_str(piece);
            let mut rest = piece.as_str();
            while let Some(at) = rest.find("```") {
                rest = &rest[at + 3..];
                open = match open {
                    Some(_) => None,
                    None => {
                        let language = rest.split('\n').next().unwrap_or_default().trim();
                        let fits = language.len() <= MAX_FENCE_LANGUAGE && !language.contains('`');
                        Some(if fits { language } else { "" })
                    }
                };
            }
            if open.is_some() {
                chunk.push_str("\n```");
            }
            chunk
        })
        .collect()
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
