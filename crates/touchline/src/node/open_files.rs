//! The process's limit on open files: raised at the start, so that the node can hold the
//! connections `server.max-connections` lets in.

/// The limit on open files at the start and after it was raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    /// The soft limit before the start raised it.
    pub before: u64,
    /// The soft limit now.
    pub now: u64,
}

/// Descriptors the node needs besides its connections: the store's files, Kafka's sockets, the
/// metrics listener, the runtime's own.
const RESERVED: u64 = 256;

/// Raises the soft limit on open files to the hard one, as Go's runtime and most servers do: the
/// usual soft limit, 1024, is below `server.max-connections` (10,000 by default), and a node out
/// of descriptors cannot accept (it pauses accepting, logged). Logs a warning when the limit is
/// still below `max_connections` plus what the node needs besides. `None` where there is no such
/// limit (not unix) or it cannot be read.
pub fn raise_open_files_limit(max_connections: usize) -> Option<OpenFiles> {
    let open_files = raise()?;
    if open_files.now > open_files.before {
        tracing::info!(
            from = open_files.before,
            to = open_files.now,
            "raised the limit on open files to the hard limit"
        );
    }
    let wanted = u64::try_from(max_connections)
        .unwrap_or(u64::MAX)
        .saturating_add(RESERVED);
    if open_files.now < wanted {
        tracing::warn!(
            limit = open_files.now,
            max_connections,
            "the limit on open files is below server.max-connections plus {RESERVED}: past it, connections wait until descriptors are free (raise the hard limit, `ulimit -Hn`, or lower server.max-connections)"
        );
    }
    Some(open_files)
}

#[cfg(unix)]
fn raise() -> Option<OpenFiles> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    // `None`: unlimited.
    let before = limit.current.unwrap_or(u64::MAX);
    // An unlimited hard limit cannot be the soft one (the kernel caps it at fs.nr_open): left as
    // it is, as is a soft limit at the hard one already.
    let now = match limit.maximum {
        Some(hard) if hard > before => {
            let raised = Rlimit {
                current: Some(hard),
                maximum: Some(hard),
            };
            match setrlimit(Resource::Nofile, raised) {
                Ok(()) => hard,
                Err(error) => {
                    // macOS refuses a soft limit above OPEN_MAX whatever the hard one says.
                    tracing::debug!(%error, hard, "cannot raise the limit on open files");
                    before
                }
            }
        }
        _ => before,
    };
    Some(OpenFiles { before, now })
}

#[cfg(not(unix))]
fn raise() -> Option<OpenFiles> {
    None
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let start = getrlimit(Resource::Nofile);
        // Below the hard limit first (by one: the other tests of this process keep theirs).
        if let (Some(soft), Some(hard)) = (start.current, start.maximum)
            && soft == hard
        {
            setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: Some(hard - 1),
                    maximum: Some(hard),
                },
            )
            .expect("a soft limit can always be lowered");
        }
        let lowered = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
        let open_files = raise_open_files_limit(10).expect("a limit on unix");
        let limit = getrlimit(Resource::Nofile);
        assert_eq!(open_files.before, lowered);
        assert_eq!(limit.current.unwrap_or(u64::MAX), open_files.now);
        if let Some(hard) = limit.maximum {
            assert_eq!(open_files.now, hard, "the soft limit is the hard one now");
        }
        // Raised already: nothing more to raise.
        let again = raise_open_files_limit(10).expect("a limit on unix");
        assert_eq!((again.before, again.now), (open_files.now, open_files.now));
    }
}
