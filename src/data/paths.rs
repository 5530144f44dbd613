//! Lexical checks of the relative paths data files name (image paths in manifests and label
//! files), so a path cannot reach outside the directory it is relative to.

use std::path::{Component, Path};

/// Whether the relative path `p`, joined to a directory, lexically leaves it: a `..` climbs above
/// the start at some point (`a/../../b`), or `p` is not relative at all (a root or a Windows
/// prefix). `.` components are ignored and `a/../b` stays inside. The check is on the text alone
/// (no file needs to exist, symlinks are not followed).
pub fn escapes_root(p: &Path) -> bool {
    let mut depth: usize = 0;
    for c in p.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return true,
            },
            Component::RootDir | Component::Prefix(_) => return true,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_components_are_counted() {
        for inside in [
            "a.png",
            "./a.png",
            "a/../b.png",
            "a/b/../../c.png",
            "a/./b.png",
        ] {
            assert!(!escapes_root(Path::new(inside)), "{inside}");
        }
        for outside in [
            "../a.png",
            "a/../../b.png",
            "./../a.png",
            "/etc/passwd",
            "a/../..",
        ] {
            assert!(escapes_root(Path::new(outside)), "{outside}");
        }
    }
}
