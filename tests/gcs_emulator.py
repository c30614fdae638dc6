"""Runs gcp-storage-emulator (`python tests/gcs_emulator.py start --port N ...`, the package's own
CLI) with one gap closed: real GCS answers a media download with the object's `x-goog-generation`
and `x-goog-metageneration` headers, and the emulator sends neither. tensorstore (orbax's gs://
writer) reads an object's generation from that header and conditions its next write of OCDBT's
manifest on it; without the header it records generation 0 and refuses that write ("Malformed
StorageGeneration"). Only the headers are added; the emulator's storage is untouched."""
import sys

from gcp_storage_emulator.handlers import objects  # before the server module: it binds handlers

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
  except Exception:  # not found: the emulator's own handler answers 404
    obj = None
  if obj is not None:
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
  return _download(request, response, storage, *args, **kwargs)


objects.download = _download_with_generation

if __name__ == "__main__":
  from gcp_storage_emulator.__main__ import main
  main(sys.argv[1:])
