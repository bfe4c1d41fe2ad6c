//! An engine and its sessions on whichever dense device the engine was
//! loaded on: two object-safe traits, implemented once for any
//! [`DenseDevice`], so that the C handles do not depend on the device.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use tandem_gpu::DenseDevice;
use tandem_runtime::tokenizer::Tokenizer;
use tandem_runtime::{Engine, Flow, Result, SamplingConfig, SavedSession, Session};

/// What the C entry points need of an engine.
pub(crate) trait AnyEngine: Send + Sync {
    fn tokenizer(&self) -> &Tokenizer;

    /// The dense device's name, e.g. `cpu (avx512, 2 threads)`.
    fn device_name(&self) -> String;

    fn session(&self) -> Result<Box<dyn AnySession + '_>>;

    fn load_session(&self, path: &Path) -> Result<SavedSession>;

    /// A session resumed from `saved` (see [`Engine::restore_session`]).
    fn restore_session(
        &self,
        saved: &SavedSession,
        cancel: Option<&AtomicBool>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Box<dyn AnySession + '_>>;
}

/// What the C entry points need of a session.
pub(crate) trait AnySession: Send {
    fn tokens(&self) -> &[u32];

    fn prefill_cancellable(
        &mut self,
        tokens: &[u32],
        progress: &mut dyn FnMut(usize, usize),
        cancel: Option<&AtomicBool>,
    ) -> Result<()>;

    fn generate(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        sampling: &SamplingConfig,
        cancel: Option<&AtomicBool>,
        on_text: &mut dyn FnMut(&str) -> Flow,
    ) -> Result<()>;

    /// Saves `saved` with this session's keys and values (see
    /// [`Engine::save_session_state`]).
    fn save_state(&self, path: &Path, saved: &SavedSession) -> Result<()>;
}

/// A session with the engine it runs on.
struct Bound<'a, D: DenseDevice> {
    engine: &'a Engine<D>,
    session: Session<'a, D>,
}

impl<D: DenseDevice + 'static> AnyEngine for Engine<D> {
    fn tokenizer(&self) -> &Tokenizer {
        Engine::tokenizer(self)
    }

    fn device_name(&self) -> String {
        self.model().device().name()
    }

    fn session(&self) -> Result<Box<dyn AnySession + '_>> {
        let session = Engine::session(self)?;
        Ok(Box::new(Bound {
            engine: self,
            session,
        }))
    }

    fn load_session(&self, path: &Path) -> Result<SavedSession> {
        Engine::load_session(self, path)
    }

    fn restore_session(
        &self,
        saved: &SavedSession,
        cancel: Option<&AtomicBool>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Box<dyn AnySession + '_>> {
        let (session, _) = Engine::restore_session(self, saved, cancel, progress)?;
        Ok(Box::new(Bound {
            engine: self,
            session,
        }))
    }
}

impl<D: DenseDevice> AnySession for Bound<'_, D> {
    fn tokens(&self) -> &[u32] {
        self.session.tokens()
    }

    fn prefill_cancellable(
        &mut self,
        tokens: &[u32],
        progress: &mut dyn FnMut(usize, usize),
        cancel: Option<&AtomicBool>,
    ) -> Result<()> {
        self.session
            .prefill_cancellable(tokens, progress, cancel)
            .map(drop)
    }

    fn generate(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        sampling: &SamplingConfig,
        cancel: Option<&AtomicBool>,
        on_text: &mut dyn FnMut(&str) -> Flow,
    ) -> Result<()> {
        self.session
            .generate(
                prompt,
                max_tokens,
                sampling,
                cancel,
                &mut |_, _| {},
                on_text,
            )
            .map(drop)
    }

    fn save_state(&self, path: &Path, saved: &SavedSession) -> Result<()> {
        self.engine.save_session_state(path, saved, &self.session)
    }
}
