import io
import os
import shutil

import numpy as np
import PIL.Image
import pytest
import torch

from ondemand_seg.real.images import ImageFolderImages, to_rgb_tensor


def test_rgb_pil_and_uint8_arrays_agree_in_either_layout():
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    expected = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    for image in (PIL.Image.fromarray(pixels), pixels, torch.from_numpy(pixels).permute(2, 0, 1)):
        out = to_rgb_tensor(image)
        assert out.shape == (3, 5, 7) and out.dtype == torch.float32
        assert torch.allclose(out, expected)


def test_grayscale_is_repeated_and_alpha_dropped():
    gray = PIL.Image.fromarray(np.full((4, 4), 51, np.uint8), "L")
    out = to_rgb_tensor(gray)
    assert torch.allclose(out, torch.full((3, 4, 4), 0.2))
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 0  # red, fully transparent: alpha dropped, not composited
    for image in (PIL.Image.fromarray(rgba, "RGBA"), rgba):
        out = to_rgb_tensor(image)
        assert out[0].eq(1).all() and out[1:].eq(0).all()


def test_sixteen_bit_images_are_scaled_not_clipped():
    values = np.array([[0, 256], [32768, 65535]], np.uint16)
    expected = torch.from_numpy(values.astype(np.float64) / 65535).float()
    pil = PIL.Image.fromarray(values)
    assert pil.mode == "I;16"
    for image in (pil, values, torch.from_numpy(values.astype(np.int32)).to(torch.uint16)):
        out = to_rgb_tensor(image)
        assert torch.allclose(out[0], expected, atol=1e-6) and torch.equal(out[0], out[2])
    # PIL's own RGB conversion would clip 256 and above to white; the mid-gray stays mid-gray here.
    assert 0.49 < to_rgb_tensor(pil)[0, 1, 0] < 0.51


def test_bad_images_name_the_image_and_the_problem():
    with pytest.raises(ValueError, match=r"images\[2\].*\[0, 1\]"):
        to_rgb_tensor(np.full((4, 4, 3), 2.0, np.float32), "images[2]")
    with pytest.raises(ValueError, match="non-finite"):
        to_rgb_tensor(torch.full((3, 4, 4), float("nan")))
    with pytest.raises(ValueError, match="shape"):
        to_rgb_tensor(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(TypeError, match="int64"):
        to_rgb_tensor(torch.zeros(3, 4, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="str"):
        to_rgb_tensor("photo.png")


def test_an_image_folder_reads_its_image_files_in_name_order_in_their_own_modes(image_folder, tmp_path):
    folder = shutil.copytree(image_folder, tmp_path / "images")
    (folder / ".hidden.png").write_bytes(b"")
    (folder / "sub").mkdir()
    (folder / "sub" / "inner.png").write_bytes(b"")
    images = ImageFolderImages(folder)
    assert images.names == ["a_rgb.png", "b_gray.png", "c_rgba.png", "d_tall.jpg", "e_flat.png"]
    assert [images[i].mode for i in range(4)] == ["RGB", "L", "RGBA", "RGB"] and images[3].size == (24, 40)
    gray = to_rgb_tensor(images[1])
    assert gray.shape == (3, 32, 32) and torch.equal(gray[0], gray[2])


def test_an_image_folder_that_cannot_be_read_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        ImageFolderImages(tmp_path / "nowhere")
    (tmp_path / "tags.json").write_text("[]")
    with pytest.raises(NotADirectoryError, match="tags.json is not a folder"):
        ImageFolderImages(tmp_path / "tags.json")
    with pytest.raises(ValueError, match=r"holds no image file \(names ending in .png, .jpg"):
        ImageFolderImages(tmp_path)
    (tmp_path / "broken.PNG").write_bytes(b"not a png")
    images = ImageFolderImages(tmp_path)
    with pytest.raises(ValueError, match=r"broken.PNG is not an image PIL can read"):
        images[0]


def test_an_image_folder_names_a_link_to_a_missing_image_and_reads_linked_images(tmp_path):
    PIL.Image.new("RGB", (4, 4)).save(tmp_path / "real.png")
    folder = tmp_path / "links"
    folder.mkdir()
    (folder / "a.png").symlink_to(tmp_path / "real.png")
    assert ImageFolderImages(folder)[0].size == (4, 4)
    (folder / "b.jpg").symlink_to(tmp_path / "moved.jpg")
    with pytest.raises(FileNotFoundError, match=r"b.jpg is a link to a file that does not exist"):
        ImageFolderImages(folder)


def test_an_image_folder_turns_photos_upright_by_their_exif_orientation(tmp_path):
    image = PIL.Image.fromarray(np.zeros((10, 20, 3), np.uint8))
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: shown 10 wide and 20 tall
    image.save(tmp_path / "photo.jpg", exif=exif)
    assert ImageFolderImages(tmp_path)[0].size == (10, 20)


def test_an_empty_or_truncated_pil_image_is_named():
    with pytest.raises(ValueError, match=r"images\[3\] is empty \(0x0 px\)"):
        to_rgb_tensor(PIL.Image.new("RGB", (0, 0)), "images[3]")
    data = io.BytesIO()
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(data, "PNG")
    truncated = PIL.Image.open(io.BytesIO(data.getvalue()[: len(data.getvalue()) // 2]))
    with pytest.raises(ValueError, match=r"images\[1\] cannot be decoded .*truncated"):
        to_rgb_tensor(truncated, "images[1]")


def test_an_image_folder_refuses_a_bool_index_and_reads_files_with_non_utf8_names(tmp_path):
    PIL.Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "a.png")
    PIL.Image.new("RGB", (8, 8), (40, 50, 60)).save(tmp_path.as_posix().encode() + b"/\xff.png")
    images = ImageFolderImages(tmp_path)
    with pytest.raises(TypeError, match="index must be an int, got True"):
        images[True]
    assert images[np.int64(1)].getpixel((0, 0)) == (40, 50, 60)


def test_an_image_replaced_by_a_fifo_after_listing_is_named_without_blocking(tmp_path):
    for name in ("a.png", "b.png"):
        PIL.Image.new("RGB", (8, 8)).save(tmp_path / name)
    images = ImageFolderImages(tmp_path)
    (tmp_path / "b.png").unlink()
    os.mkfifo(tmp_path / "b.png")  # opening it to read would wait for a writer for ever
    with pytest.raises(ValueError, match=r"b.png is not an image PIL can read: .*b.png is a FIFO"):
        images[1]
    assert images[0].size == (8, 8)
