//! Locating the real programs the suite runs. A missing program is an error
//! naming the Debian package to install, never a skipped test.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// A program and the Debian package that ships it.
#[derive(Clone, Copy, Debug)]
pub struct Tool {
    pub binary: &'static str,
    pub package: &'static str,
}

pub const PROMETHEUS: Tool = Tool {
    binary: "prometheus",
    package: "prometheus",
};
pub const NODE_EXPORTER: Tool = Tool {
    binary: "prometheus-node-exporter",
    package: "prometheus-node-exporter",
};
pub const VICTORIA_METRICS: Tool = Tool {
    binary: "victoria-metrics",
    package: "victoria-metrics",
};
pub const VMAGENT: Tool = Tool {
    binary: "vmagent",
    package: "victoria-metrics",
};
pub const NGINX: Tool = Tool {
    binary: "nginx",
    package: "nginx",
};

impl Tool {
    /// The program's path, or an error telling which package to install.
    /// `CHAOS_<BINARY>_BIN` (upper case, `-` as `_`) overrides the search.
    pub fn path(&self) -> Result<PathBuf> {
        let var = format!("CHAOS_{}_BIN", self.binary.to_uppercase().replace('-', "_"));
        if let Some(p) = std::env::var_os(&var) {
            let p = PathBuf::from(p);
            if is_executable(&p) {
                return Ok(p);
            }
            bail!("{var}={} is not an executable file", p.display());
        }
        let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default();
        for d in ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin"] {
            dirs.push(PathBuf::from(d));
        }
        for d in dirs {
            let p = d.join(self.binary);
            if is_executable(&p) {
                return Ok(p);
            }
        }
        bail!(
            "`{}` is not installed: this test needs the real program. Install Debian's `{}` \
             package (`apt-get install -y {}`), or point {var} at the binary.",
            self.binary,
            self.package,
            self.package
        )
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tool_names_the_package() {
        let t = Tool {
            binary: "chaos-no-such-program",
            package: "chaos-pkg",
        };
        let msg = format!(
            "{:#}",
            t.path().err().map(|e| e.to_string()).unwrap_or_default()
        );
        assert!(msg.contains("apt-get install -y chaos-pkg"), "{msg}");
        assert!(
            PROMETHEUS.path().is_ok(),
            "prometheus must be installed here"
        );
    }
}
