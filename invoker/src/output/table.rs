//! Columns for people: a header row and rows of cells, each column as wide as its
//! widest cell, two spaces apart; the last column is not padded, so a long answer
//! wraps instead of widening every line. Every cell's text is escaped
//! ([`escape::text`]): cells hold what devices supplied.

use anstyle::Style;

use super::{Paint, escape, style};

/// One cell: its text and, on a terminal, its style.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cell {
    text: String,
    style: Option<Style>,
}

impl Cell {
    /// A cell without style.
    pub fn plain(text: impl AsRef<str>) -> Self {
        Self {
            text: escape::text(text.as_ref()).into_owned(),
            style: None,
        }
    }

    /// A cell in `style`.
    pub fn styled(text: impl AsRef<str>, style: Style) -> Self {
        Self {
            text: escape::text(text.as_ref()).into_owned(),
            style: Some(style),
        }
    }
}

impl From<&str> for Cell {
    fn from(text: &str) -> Self {
        Self::plain(text)
    }
}

impl From<String> for Cell {
    fn from(text: String) -> Self {
        Self::plain(text)
    }
}

/// A table for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<Cell>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new(header: &[&'static str]) -> Self {
        Self {
            header: header.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; it should have a cell per column.
    pub fn row(&mut self, cells: Vec<Cell>) {
        self.rows.push(cells);
    }

    /// The table as lines, the header in bold when painting.
    pub fn render(&self, paint: Paint) -> String {
        let header: Vec<Cell> = self
            .header
            .iter()
            .map(|h| Cell::styled(*h, style::HEADER))
            .collect();
        let lines = std::iter::once(&header).chain(&self.rows);
        let mut widths = vec![0; self.header.len()];
        for row in lines.clone() {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.text.chars().count());
            }
        }
        let mut out = String::new();
        for row in lines {
            let mut line = String::new();
            for (at, cell) in row.iter().enumerate() {
                if at > 0 {
                    line.push_str("  ");
                }
                line.push_str(&match cell.style {
                    Some(style) => paint.paint(style, &cell.text),
                    None => cell.text.clone(),
                });
                if at + 1 < row.len() {
                    let width = widths.get(at).copied().unwrap_or(0);
                    let pad = width.saturating_sub(cell.text.chars().count());
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_and_the_last_one_is_not_padded() {
        let mut table = Table::new(&["DEVICE", "STATE", "ANSWER"]);
        table.row(vec!["pump-1".into(), "online".into(), "{}".into()]);
        table.row(vec![
            "a".into(),
            Cell::styled("offline", style::WARN),
            "".into(),
        ]);
        assert_eq!(
            table.render(Paint::NONE),
            "DEVICE  STATE    ANSWER\n\
             pump-1  online   {}\n\
             a       offline\n"
        );
        let painted = table.render(Paint::new(true));
        assert!(
            painted.starts_with("\u{1b}[1mDEVICE\u{1b}[0m  "),
            "{painted:?}"
        );
        assert!(
            painted.contains("a       \u{1b}[33moffline\u{1b}[0m\n"),
            "{painted:?}"
        );
    }
}
