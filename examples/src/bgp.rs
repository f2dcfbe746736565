//! Placeholder until the BIRD control client lands (replaced by the real module).
#![allow(missing_docs, clippy::missing_errors_doc)]
use std::io;
use std::path::Path;

#[derive(Debug)]
pub struct Bird;

impl Bird {
    pub fn connect(_path: &Path) -> io::Result<Bird> {
        Err(io::Error::other("BIRD client not built yet"))
    }
    pub fn enable(&mut self, _protocol: &str) -> io::Result<()> {
        Ok(())
    }
    pub fn disable(&mut self, _protocol: &str) -> io::Result<()> {
        Ok(())
    }
}
