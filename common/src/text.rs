//! Text cut into pieces without breaking characters.
//!
//! Logs are bytes; fragments on the wire are JSON strings. Cutting the bytes at a fixed
//! size and decoding each piece alone turns a character that straddles the cut into
//! U+FFFD on both sides. Every place that splits log text into fragments uses
//! [`utf8_chunks`].

/// Splits `bytes` into strings of at most `max` bytes (at least one character each), cut
/// only at character boundaries. Bytes that are not UTF-8 at all (binary noise on a
/// serial line) become U+FFFD, each once.
///
/// `max` below 4 is raised to 4 (one character of any width fits).
pub fn utf8_chunks(bytes: &[u8], max: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let end = utf8_cut(rest, max);
        out.push(String::from_utf8_lossy(&rest[..end]).into_owned());
        rest = &rest[end..];
    }
    out
}

/// Where [`utf8_chunks`] ends its first string: at most `max` bytes (raised to 4), at a
/// character boundary. A reader of a stream that keeps more than `max` bytes buffered
/// (or has reached the end) cuts exactly where [`utf8_chunks`] of the whole would.
pub fn utf8_cut(bytes: &[u8], max: usize) -> usize {
    let max = max.max(4);
    let mut end = bytes.len().min(max);
    if end < bytes.len() {
        // Back up to the start of a character: continuation bytes are 0b10xxxxxx.
        let mut cut = end;
        while cut > 0 && (bytes[cut] & 0xC0) == 0x80 && end - cut < 4 {
            cut -= 1;
        }
        if cut > 0 && (bytes[cut] & 0xC0) != 0x80 {
            end = cut;
        }
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn characters_across_the_cut_survive() {
        // 'é' (2 bytes) and '😀' (4 bytes) placed across every possible cut.
        for pad in 0..8 {
            let text = format!("{}é😀x", "a".repeat(pad));
            for max in 4..12 {
                let chunks = utf8_chunks(text.as_bytes(), max);
                assert_eq!(chunks.concat(), text, "pad {pad} max {max}");
                assert!(chunks.iter().all(|c| c.len() <= max), "pad {pad} max {max}");
                assert!(!chunks.concat().contains('\u{FFFD}'));
            }
        }
    }

    #[test]
    fn invalid_bytes_are_replaced_once() {
        let chunks = utf8_chunks(b"ok\xff\xfeok", 3);
        assert_eq!(chunks.concat(), "ok\u{FFFD}\u{FFFD}ok");
    }

    #[test]
    fn one_mebibyte_boundaries() {
        let mut data = vec![b'a'; (1 << 20) - 1];
        data.extend_from_slice("é".as_bytes());
        data.extend(std::iter::repeat_n(b'b', (1 << 20) - 3));
        data.extend_from_slice("😀".as_bytes());
        let chunks = utf8_chunks(&data, 1 << 20);
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks.concat().as_bytes(), &data[..]);
    }
}
