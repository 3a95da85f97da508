//! One rollback mechanism for ADD: each completed step registers its undo; unless the guard
//! is disarmed at the end, the undos run in reverse order when it is dropped.

use crate::cni::Result;

type Undo<'a> = Box<dyn FnOnce() -> Result<()> + 'a>;

#[derive(Default)]
pub struct Rollback<'a> {
    steps: Vec<(&'static str, Undo<'a>)>,
}

impl<'a> Rollback<'a> {
    pub fn new() -> Self {
        Rollback { steps: Vec::new() }
    }

    pub fn push(&mut self, what: &'static str, undo: impl FnOnce() -> Result<()> + 'a) {
        self.steps.push((what, Box::new(undo)));
    }

    /// Everything succeeded: keep it all.
    pub fn disarm(mut self) {
        self.steps.clear();
    }
}

impl Drop for Rollback<'_> {
    fn drop(&mut self) {
        while let Some((what, undo)) = self.steps.pop() {
            if let Err(e) = undo() {
                tracing::error!(step = what, error = %e, "rollback step failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[test]
    fn undoes_in_reverse_unless_disarmed() {
        let log = RefCell::new(Vec::new());
        {
            let mut rollback = Rollback::new();
            rollback.push("a", || {
                log.borrow_mut().push("a");
                Ok(())
            });
            rollback.push("b", || {
                log.borrow_mut().push("b");
                Ok(())
            });
        }
        assert_eq!(*log.borrow(), vec!["b", "a"]);

        log.borrow_mut().clear();
        let mut rollback = Rollback::new();
        rollback.push("a", || {
            log.borrow_mut().push("a");
            Ok(())
        });
        rollback.disarm();
        assert!(log.borrow().is_empty());
    }
}
