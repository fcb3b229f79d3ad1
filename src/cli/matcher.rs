//! PromQL-style series selectors for `wal dump --match`:
//! `{__name__="up",job=~"node.*"}`, `up{instance!="a"}` or just `up`.
//!
//! As in Prometheus, a label the series lacks has the empty value, and
//! regular expressions are anchored at both ends.

use anyhow::{anyhow, bail, Result};
use regex::Regex;

use prom_remote_write::v1::Label;

#[derive(Debug, Clone)]
enum Op {
    Eq(String),
    Ne(String),
    Re(Regex),
    NotRe(Regex),
}

/// One `name op "value"` condition.
#[derive(Debug, Clone)]
struct LabelMatcher {
    name: String,
    op: Op,
}

/// A parsed selector: every condition must hold.
#[derive(Debug, Clone)]
pub struct Selector {
    matchers: Vec<LabelMatcher>,
}

impl Selector {
    /// Parses a selector.
    ///
    /// # Errors
    /// A syntax error (with its position) or a bad regular expression.
    pub fn parse(s: &str) -> Result<Selector> {
        let mut p = Parser {
            s: s.as_bytes(),
            src: s,
            pos: 0,
        };
        let mut matchers = Vec::new();
        p.skip_ws();
        if p.peek().is_some_and(|c| c != b'{') {
            let name = p.ident()?;
            matchers.push(LabelMatcher {
                name: prom_remote_write::METRIC_NAME_LABEL.into(),
                op: Op::Eq(name),
            });
            p.skip_ws();
        }
        if p.peek() == Some(b'{') {
            p.pos += 1;
            loop {
                p.skip_ws();
                if p.peek() == Some(b'}') {
                    p.pos += 1;
                    break;
                }
                let name = p.ident()?;
                p.skip_ws();
                let op = p.op()?;
                p.skip_ws();
                let value = p.string()?;
                let anchored = || {
                    Regex::new(&format!("^(?:{value})$"))
                        .map_err(|e| anyhow!("bad regular expression {value:?} for {name}: {e}"))
                };
                let op = match op {
                    "=" => Op::Eq(value.clone()),
                    "!=" => Op::Ne(value.clone()),
                    "=~" => Op::Re(anchored()?),
                    _ => Op::NotRe(anchored()?),
                };
                matchers.push(LabelMatcher { name, op });
                p.skip_ws();
                match p.peek() {
                    Some(b',') => p.pos += 1,
                    Some(b'}') => {}
                    _ => return Err(p.error("expected ',' or '}'")),
                }
            }
        }
        p.skip_ws();
        if p.pos != p.s.len() {
            return Err(p.error("unexpected text after the selector"));
        }
        if matchers.is_empty() {
            bail!(
                "selector {s:?} matches nothing: give a metric name or at least one label matcher"
            );
        }
        Ok(Selector { matchers })
    }

    /// True when the series with `labels` matches every condition.
    pub fn matches(&self, labels: &[Label]) -> bool {
        self.matchers.iter().all(|m| {
            let v = labels
                .iter()
                .find(|l| l.name == m.name)
                .map_or("", |l| l.value.as_str());
            match &m.op {
                Op::Eq(x) => v == x,
                Op::Ne(x) => v != x,
                Op::Re(r) => r.is_match(v),
                Op::NotRe(r) => !r.is_match(v),
            }
        })
    }
}

struct Parser<'a> {
    s: &'a [u8],
    src: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            self.pos += 1;
        }
    }

    fn error(&self, what: &str) -> anyhow::Error {
        anyhow!(
            "bad selector {:?} at position {}: {what}",
            self.src,
            self.pos
        )
    }

    fn ident(&mut self) -> Result<String> {
        let start = self.pos;
        while let Some(c) = self.peek() {
            let ok = c == b'_'
                || c == b':'
                || c.is_ascii_alphabetic()
                || (self.pos > start && c.is_ascii_digit());
            if !ok {
                break;
            }
            self.pos += 1;
        }
        if self.pos == start {
            return Err(self.error("expected a label or metric name"));
        }
        Ok(self.src[start..self.pos].to_owned())
    }

    fn op(&mut self) -> Result<&'static str> {
        let rest = &self.s[self.pos..];
        for op in ["=~", "!~", "!=", "="] {
            if rest.starts_with(op.as_bytes()) {
                self.pos += op.len();
                return Ok(op);
            }
        }
        Err(self.error("expected =, !=, =~ or !~"))
    }

    fn string(&mut self) -> Result<String> {
        let quote = match self.peek() {
            Some(q @ (b'"' | b'\'' | b'`')) => q,
            _ => return Err(self.error("expected a quoted value")),
        };
        self.pos += 1;
        let mut out = String::new();
        let mut chars = self.src[self.pos..].char_indices();
        while let Some((i, c)) = chars.next() {
            if c as u32 == u32::from(quote) {
                self.pos += i + 1;
                return Ok(out);
            }
            if c == '\\' && quote != b'`' {
                match chars.next() {
                    Some((_, 'n')) => out.push('\n'),
                    Some((_, 't')) => out.push('\t'),
                    Some((_, other)) => out.push(other),
                    None => break,
                }
            } else {
                out.push(c);
            }
        }
        Err(self.error("unterminated string"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Vec<Label> {
        pairs
            .iter()
            .map(|(n, v)| Label {
                name: (*n).into(),
                value: (*v).into(),
            })
            .collect()
    }

    #[test]
    fn selectors_match_like_promql_with_anchored_regexes_and_empty_missing_labels() {
        let s = Selector::parse(r#"{__name__="up", job=~"node.*",instance!="a", zone!~"eu-.*"}"#)
            .unwrap();
        assert!(s.matches(&labels(&[
            ("__name__", "up"),
            ("job", "node1"),
            ("instance", "b")
        ])));
        assert!(!s.matches(&labels(&[
            ("__name__", "up"),
            ("job", "xnode"),
            ("instance", "b")
        ])));
        assert!(!s.matches(&labels(&[
            ("__name__", "up"),
            ("job", "node"),
            ("instance", "a")
        ])));
        assert!(!s.matches(&labels(&[
            ("__name__", "up"),
            ("job", "node"),
            ("zone", "eu-1")
        ])));
        let s = Selector::parse("up{team=\"\"}").unwrap();
        assert!(s.matches(&labels(&[("__name__", "up")])));
        assert!(!s.matches(&labels(&[("__name__", "up"), ("team", "x")])));
        assert!(Selector::parse("up")
            .unwrap()
            .matches(&labels(&[("__name__", "up")])));
        assert!(Selector::parse("{job=}").is_err());
        assert!(Selector::parse("{job=~\"(\"}").is_err());
        assert!(Selector::parse("{}").is_err());
        assert!(Selector::parse("up{a=\"b\"} x").is_err());
    }
}
