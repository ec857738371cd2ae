//! `northstar replay`: sets derived state aside so the next start rebuilds it.

use anyhow::Context;
use clap::Args;

use super::DataDir;

#[derive(Args)]
pub(super) struct ReplayArgs {
    #[command(flatten)]
    data: DataDir,
}

impl ReplayArgs {
    pub(super) fn run(self) -> anyhow::Result<()> {
        let data = self.data.path;
        let Some(_lock) = northstar::files::lock_dir(&data)
            .with_context(|| format!("locking data dir {}", data.display()))?
        else {
            anyhow::bail!(
                "a northstar server is running on {}: stop it first, then run replay",
                data.display()
            );
        };
        let stamp =
            northstar::clock::format_micros(northstar::clock::system_micros()).replace(':', "-");
        let moved = northstar::replay::set_aside(&data, &stamp)
            .with_context(|| format!("setting derived state aside in {}", data.display()))?;
        if moved.is_empty() {
            say!(
                "no derived state in {}: the next start builds it anyway",
                data.display()
            );
        }
        for (from, to) in &moved {
            say!("set aside {} -> {}", from.display(), to.display());
        }
        say!(
            "the next `northstar serve --data {}` rebuilds it: from Parquet for what the stream no longer holds, then from the stream (`/healthz` answers 503 until the meter has caught up)",
            data.display()
        );
        Ok(())
    }
}
