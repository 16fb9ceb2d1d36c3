"""LiverTumorSeg: liver, liver tumor and cyst segmentation on CT, with live post-processing.

Widget = Qt only (copies ``LiverTumorSegSlicer.panel`` rules onto widgets); Logic = MRML only,
importable without Qt (tested on the PyPI package slicer-core); Test = the self-test, whose cases
also run in CI. Data flows one way: volume node -> core (in a child process) -> labels + region
table -> segments.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import unittest
from pathlib import Path

import slicer
import vtk

try:  # the Slicer application
    import qt
    from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                               ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
except ImportError:  # Slicer's MRML libraries alone (slicer-core): Logic and Test only
    qt = None

    class ScriptedLoadableModule:  # noqa: D101 - stand-ins: only Logic and Test are used here
        pass

    class ScriptedLoadableModuleWidget:  # noqa: D101
        pass

    ScriptedLoadableModuleLogic = object
    ScriptedLoadableModuleTest = unittest.TestCase
from slicer.util import VTKObservationMixin

# Only what Slicer itself provides (numpy, SimpleITK, MRML) is imported here: the module must load
# before the core's other packages (torch, cc3d, MONAI, ...) are installed. ``finish`` imports the rest.
from LiverTumorSegLib.imageio import check_ct, ct_warnings, write_volume
from LiverTumorSegLib.registry import BUNDLED, DEFAULT_MODEL, IMPORTABLE, model_files
from LiverTumorSegSlicer import dependencies, mrml, panel, runner


class LiverTumorSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Liver Tumor Segmentation"
        self.parent.categories = ["Segmentation"]
        self.parent.contributors = ["LiverTumorSeg developers"]
        self.parent.helpText = (
            "Segments the liver, liver tumors and cysts in a CT with a two-stage G-UNETR++ network, then lets you "
            "tune small-tumor dilation, the HU Gaussian cyst filter and the HU outline refinement live, region by region. "
            "Research use only; the bundled weights are trained on synthetic phantoms (and one real CT): not for clinical use.")
        self.parent.acknowledgementText = "G-UNETR++ (Lee et al.), UNETR++ (Shaker et al.); built on 3D Slicer, PyTorch and MONAI."


# ---------------------------------------------------------------- Logic (MRML only)


class LiverTumorSegLogic(ScriptedLoadableModuleLogic):
    """Runs the core on a volume node in a child process and keeps the result live.

    ``start`` -> poll ``run`` (or ``wait``) -> ``finish`` creates/updates the segmentation node and
    returns a ``LiveResult`` whose ``update``/``set_decision`` re-run only the post-processing.
    A failed or cancelled run leaves the scene exactly as it was. Nothing the user made is replaced
    without an answer: a node made for another volume is refused (``output_problem``); a node that
    already holds a result raises ``mrml.ExistingResultError`` (``finish(..., replace=True)``
    replaces it); writing over segments the user edited raises ``mrml.EditedSegmentsError`` and
    keeps the result pending (``finish(..., overwrite_edited=True)`` writes it). ``discard`` drops
    a result not written.
    """

    def __init__(self):
        if ScriptedLoadableModuleLogic is not object:
            ScriptedLoadableModuleLogic.__init__(self)
        self.run: runner.ChildRun | None = None
        self.work_dir: Path | None = None
        self.live: LiveResult | None = None
        self.pending: tuple[LiveResult, bool] | None = None  # (result, node created for it) awaiting an answer

    @staticmethod
    def input_problem(volume_node) -> str | None:
        """Why this node cannot be segmented (not a scalar volume, or not a CT), or None."""
        problem = mrml.node_input_problem(volume_node)
        if problem:
            return problem
        try:
            check_ct(mrml.volume_from_node(volume_node))
        except Exception as err:  # noqa: BLE001 - the core's message is the reason
            return str(err)
        return None

    @staticmethod
    def output_problem(volume_node, seg_node) -> str | None:
        """Why the result cannot go into the chosen segmentation node (made for another volume), or None."""
        return mrml.output_problem(volume_node, seg_node)

    @staticmethod
    def model_problem(model: str) -> str | None:
        try:
            model_files(model)
        except Exception as err:  # noqa: BLE001
            return str(err)
        return None

    def start(self, volume_node, *, model: str = DEFAULT_MODEL, device: str = "auto", fast: bool = False,
              tta: bool = True, python: str | None = None) -> runner.ChildRun:
        """Write the CT to a temporary folder and start the child process on it."""
        volume = mrml.volume_from_node(volume_node)
        check_ct(volume)
        self.discard()
        self.work_dir = Path(tempfile.mkdtemp(prefix="LiverTumorSeg-"))
        try:
            ct_file = write_volume(volume, self.work_dir / "ct.nrrd")
            cmd = runner.segment_command(python or runner.python_for_child(), ct_file, self.work_dir,
                                         model=model, device=device, fast=fast, tta=tta)
            self.run = runner.ChildRun(cmd, env=runner.child_environment(runner.default_threads()))
        except Exception:
            self.cleanup()
            raise
        return self.run

    def warnings(self, volume_node) -> list[str]:
        return ct_warnings(mrml.volume_from_node(volume_node))

    def finish(self, volume_node, seg_node=None, *, replace: bool = False, overwrite_edited: bool = False) -> LiveResult:
        """Bring the finished run's output into the scene (a new segmentation node unless one is given)."""
        if self.pending is None:
            problem = self.output_problem(volume_node, seg_node)
            if problem:
                raise mrml.NodeInputError(problem)
            if seg_node is not None and mrml.holds_result(seg_node) and not replace:
                raise mrml.ExistingResultError(seg_node)  # nothing read yet: answer, then finish again
            self.pending = self._read_result(volume_node, seg_node)
        live, created = self.pending
        try:
            live.update(overwrite_edited=overwrite_edited)
        except mrml.EditedSegmentsError:
            raise  # still pending: the caller asks the user
        except Exception:
            self.discard()
            raise
        self.pending, self.live = None, live
        return live

    def _read_result(self, volume_node, seg_node) -> tuple[LiveResult, bool]:
        from LiverTumorSegSlicer.session import LiveResult  # needs the core's packages (torch, cc3d)

        if self.work_dir is None or not (self.work_dir / "labels.nii.gz").is_file():
            raise RuntimeError("No finished segmentation to load.")
        if self.live is not None:  # stores its fingerprints, so the new writer sees the user's edits
            self.live.close()
            self.live = None
        created = seg_node is None
        if created:
            seg_node = mrml.create_segmentation_node(volume_node)
        try:
            return LiveResult.from_folder(volume_node, seg_node, self.work_dir), created
        except Exception:
            if created:
                volume_node.GetScene().RemoveNode(seg_node)
            raise
        finally:
            self.cleanup()

    def discard(self) -> None:
        """Drop a pending result (the user kept their edits) and the temporary folder."""
        if self.pending is not None:
            live, created = self.pending
            live.close()
            scene = live.seg_node.GetScene()  # None once the scene was closed
            if created and scene is not None:
                scene.RemoveNode(live.seg_node)
            self.pending = None
        self.cleanup()

    def segment(self, volume_node, seg_node=None, *, timeout: float | None = None, replace: bool = False,
                **options) -> LiveResult:
        """Blocking: start, wait, finish (scripts and self-tests); ``replace``: as ``finish``'s."""
        self.start(volume_node, **options)
        try:
            done = self.run.wait(timeout)[-1]
        except BaseException:  # a timeout (or an interrupt): stop the child, remove its folder
            self.cancel()
            self.cleanup()
            raise
        if done.returncode != 0:
            self.cleanup()
            raise RuntimeError(done.error or "segmentation cancelled")
        try:
            return self.finish(volume_node, seg_node, replace=replace)
        except (mrml.ExistingResultError, mrml.NodeInputError):
            self.cleanup()
            raise

    def cancel(self) -> None:
        if self.run is not None:
            self.run.cancel()

    def cleanup(self) -> None:
        """Remove the temporary folder of the last run."""
        if self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)
            self.work_dir = None


# ---------------------------------------------------------------- Widget (Qt only)


class LiverTumorSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Qt only: reads controls, calls the Logic, copies ``panel`` rules and results onto widgets."""

    POLL_MS = 100

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.timer = None
        self._updating = False
        self._problems = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        ui_widget = slicer.util.loadUI(self.resourcePath("UI/LiverTumorSeg.ui"))
        self.layout.addWidget(ui_widget)
        self.ui = slicer.util.childWidgetVariables(ui_widget)
        ui_widget.setMRMLScene(slicer.mrmlScene)
        self.logic = LiverTumorSegLogic()
        self.timer = qt.QTimer()
        self.timer.setInterval(self.POLL_MS)
        self.timer.timeout.connect(self.onPoll)
        ui = self.ui
        for name in [*BUNDLED, *(n for n in IMPORTABLE if self.logic.model_problem(n) is None)]:
            ui.modelSelector.addItem(name, name)
        ui.deviceSelector.addItem("auto", "auto")
        ui.deviceSelector.addItem("CPU", "cpu")
        for label, device in _cuda_devices():
            ui.deviceSelector.addItem(label, device)
        ui.regionTable.setColumnCount(len(panel.REGION_COLUMNS))
        ui.regionTable.setHorizontalHeaderLabels(list(panel.REGION_COLUMNS))
        ui.regionTable.setSelectionBehavior(qt.QAbstractItemView.SelectRows)
        ui.regionTable.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)
        ui.inputVolumeSelector.currentNodeChanged.connect(self.onInputsChanged)
        ui.outputSegmentationSelector.currentNodeChanged.connect(self.onInputsChanged)
        ui.modelSelector.currentIndexChanged.connect(self.onInputsChanged)
        ui.loadModelButton.clicked.connect(self.onLoadModel)
        ui.applyButton.clicked.connect(self.onApply)
        for control in (ui.dilateIterationsSpinBox, ui.dilateMaxAreaSpinBox):
            control.valueChanged.connect(self.onPostProcessingChanged)
        ui.dilateModeComboBox.currentIndexChanged.connect(self.onPostProcessingChanged)
        ui.cystFilterCheckBox.toggled.connect(self.onPostProcessingChanged)
        ui.cystThresholdSlider.valueChanged.connect(self.onPostProcessingChanged)
        ui.cystCoreCheckBox.toggled.connect(self.onPostProcessingChanged)
        ui.refineCheckBox.toggled.connect(self.onPostProcessingChanged)
        ui.refineMmSpinBox.valueChanged.connect(self.onPostProcessingChanged)
        ui.minPeakSpinBox.valueChanged.connect(self.onPostProcessingChanged)
        ui.regionTable.itemSelectionChanged.connect(self.onRegionSelected)
        ui.markTumorButton.clicked.connect(lambda: self.onDecision("tumor"))
        ui.markCystButton.clicked.connect(lambda: self.onDecision("cyst"))
        ui.resetDecisionButton.clicked.connect(lambda: self.onDecision(None))
        ui.copyLogButton.clicked.connect(lambda: qt.QApplication.clipboard().setText(ui.logText.toPlainText()))
        for control in (ui.inputVolumeSelector, ui.outputSegmentationSelector):
            control.currentNodeChanged.connect(self.saveChoices)
        for control in (ui.modelSelector, ui.deviceSelector):
            control.currentIndexChanged.connect(self.saveChoices)
        ui.fastCheckBox.toggled.connect(self.saveChoices)
        ui.ttaCheckBox.toggled.connect(self.saveChoices)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartSaveEvent, self.onSceneStartSave)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.restoreChoices)
        self.restoreChoices()
        self.updateView()

    # ------------------------------------------------------------ the scene

    def restoreChoices(self, *_):
        """Put the choices saved with the scene back onto the controls."""
        choices = mrml.load_choices(slicer.mrmlScene)
        ui, self._updating = self.ui, True
        try:
            if choices["volume_node"] is not None:
                ui.inputVolumeSelector.setCurrentNode(choices["volume_node"])
            if choices["seg_node"] is not None:
                ui.outputSegmentationSelector.setCurrentNode(choices["seg_node"])
            if choices["model"]:
                if ui.modelSelector.findData(choices["model"]) < 0:
                    ui.modelSelector.addItem(choices["model"], choices["model"])
                ui.modelSelector.currentIndex = ui.modelSelector.findData(choices["model"])
            index = ui.deviceSelector.findData(choices["device"])
            ui.deviceSelector.currentIndex = max(index, 0)
            ui.fastCheckBox.checked = choices["fast"]
            ui.ttaCheckBox.checked = choices["tta"]
        finally:
            self._updating = False

    def saveChoices(self, *_):
        if self._updating:
            return
        ui = self.ui
        mrml.save_choices(slicer.mrmlScene, volume_node=ui.inputVolumeSelector.currentNode(),  # None clears
                          seg_node=ui.outputSegmentationSelector.currentNode(), model=ui.modelSelector.currentData,
                          device=ui.deviceSelector.currentData, fast=ui.fastCheckBox.checked, tta=ui.ttaCheckBox.checked)

    def onSceneStartSave(self, *_):
        if self.logic.live is not None:
            self.logic.live.writer.flush_fingerprints()

    def onSceneEndClose(self, *_):
        if self.logic.run is not None and self.logic.run.running():  # its volume is gone
            self.logic.cancel()
        self.logic.discard()
        if self.logic.live is not None:
            self.logic.live.close()
            self.logic.live = None
        self.showRegions()
        self.updateView()

    def cleanup(self):
        if self.timer is not None:
            self.timer.stop()
        if self.logic is not None:
            self.logic.cancel()
            self.logic.discard()
        self.removeObservers()

    # ------------------------------------------------------------ state

    def onInputsChanged(self, *_):
        """Check the inputs once per change (the CT check reads the volume: not on every poll)."""
        volume = self.ui.inputVolumeSelector.currentNode()
        self._problems = {"volume": self.logic.input_problem(volume),
                          "model": self.logic.model_problem(self.ui.modelSelector.currentData),
                          "output": self.logic.output_problem(volume, self.ui.outputSegmentationSelector.currentNode()),
                          "missing": tuple(dependencies.missing())}
        self.ui.disclaimerLabel.text = panel.disclaimer(self.ui.modelSelector.currentData)
        self.updateView()

    def state(self) -> panel.PanelInputs:
        if self._problems is None:
            self.onInputsChanged()
        return panel.PanelInputs(
            volume_problem=self._problems["volume"],
            model_problem=self._problems["model"],
            output_problem=self._problems["output"],
            missing_packages=self._problems["missing"],
            running=self.timer.isActive(),  # until its end is handled, not only while the process lives
            has_result=self.logic.live is not None,
        )

    def updateView(self, *_):
        view = panel.panel_view(self.state())
        ui = self.ui
        ui.applyButton.text = view.button_text
        ui.applyButton.enabled = view.button_enabled
        ui.applyButton.toolTip = view.button_tooltip
        for w in (ui.inputVolumeSelector, ui.modelSelector, ui.loadModelButton, ui.deviceSelector,
                  ui.outputSegmentationSelector, ui.fastCheckBox, ui.ttaCheckBox):
            w.enabled = view.inputs_enabled
        ui.postCollapsibleButton.enabled = view.postprocessing_enabled
        ui.progressBar.visible = view.progress_visible

    # ------------------------------------------------------------ running

    def onLoadModel(self):
        folder = qt.QFileDialog.getExistingDirectory(None, "Folder with liver.ltsm and tumor.ltsm")
        if folder:
            self.ui.modelSelector.addItem(folder, folder)
            self.ui.modelSelector.currentIndex = self.ui.modelSelector.count - 1

    def onApply(self):
        if self.timer.isActive():  # a run whose end is not handled yet: Cancel (a no-op once it exited)
            self.logic.cancel()
            return
        if not self.ensureDependencies():
            return
        volume = self.ui.inputVolumeSelector.currentNode()
        try:
            self.logic.start(volume, model=self.ui.modelSelector.currentData, device=self.ui.deviceSelector.currentData,
                             fast=self.ui.fastCheckBox.checked, tta=self.ui.ttaCheckBox.checked)
        except Exception as err:  # noqa: BLE001 - shown to the user, scene untouched
            slicer.util.errorDisplay(f"Cannot start: {err}")
            return
        self.ui.logText.plainText = ""
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = "Starting..."
        for warning in self.logic.warnings(volume):
            self.ui.logText.appendPlainText(f"warning: {warning}")
        self.timer.start()
        self.updateView()

    def onPoll(self):
        for event in self.logic.run.poll():
            if isinstance(event, runner.Progress):
                self.ui.progressBar.value = int(100 * event.fraction)
                self.ui.statusLabel.text = event.message
            elif isinstance(event, runner.Log):
                self.ui.logText.appendPlainText(event.line)
            elif isinstance(event, runner.Finished):
                self.timer.stop()
                self.onFinished(event)
        self.updateView()

    def onFinished(self, event):
        if event.cancelled or event.returncode != 0:
            self.logic.cleanup()
            self.ui.statusLabel.text = "Cancelled; the scene is unchanged." if event.cancelled else f"Failed: {event.error}"
            if not event.cancelled:
                self.ui.logCollapsibleButton.collapsed = False
            return
        volume, seg = self.ui.inputVolumeSelector.currentNode(), self.ui.outputSegmentationSelector.currentNode()
        try:
            live = self._finishAsking(volume, seg)
            if live is None:
                return
        except Exception as err:  # noqa: BLE001 - e.g. the volume was removed during the run
            self.logic.discard()
            self.ui.statusLabel.text = f"Failed to load the result: {err}"
            self.ui.logText.appendPlainText(f"error: {err}")
            self.ui.logCollapsibleButton.collapsed = False
            return
        finally:
            self.updateView()
        self.ui.outputSegmentationSelector.setCurrentNode(live.seg_node)
        self.showSettings(live.params)
        self.ui.statusLabel.text = panel.status_line(live.report)
        self.showRegions()

    def _finishAsking(self, volume, seg):
        """``finish``, asking first where it would replace a result or the user's edits; None if they said no."""
        answers = {}
        while True:
            try:
                return self.logic.finish(volume, seg, **answers)
            except mrml.ExistingResultError as err:
                question, key = f"{err} Replace it?", "replace"
            except mrml.EditedSegmentsError as err:
                question, key = f"{err} Replace them?", "overwrite_edited"
            if not slicer.util.confirmOkCancelDisplay(question):
                self.logic.discard()
                self.ui.statusLabel.text = "Kept what was there; the new result was not written."
                return None
            answers[key] = True

    def ensureDependencies(self) -> bool:
        """Install what the core still needs, after asking; never replaces Slicer's own packages.
        False when the user declines or an install fails (a failure is reported in a message box; pip's
        log is in the Python console)."""
        missing = dependencies.missing()
        if not missing:
            return True
        try:
            if "torch" in missing and not self._installTorch():
                return False
            rest = [r for r in missing if r != "torch"]
            if rest and not self._installPackages(rest):
                return False
        except Exception as err:  # noqa: BLE001 - pip or the PyTorch extension failed: say so, keep the panel
            slicer.util.errorDisplay("Installing the Python packages LiverTumorSeg needs failed. Check the network "
                                     "connection and the Python console, then try again.", detailedText=str(err))
            return False
        for label, device in _cuda_devices():  # torch may be new: offer its GPUs
            if self.ui.deviceSelector.findData(device) < 0:
                self.ui.deviceSelector.addItem(label, device)
        self.onInputsChanged()
        return not dependencies.missing()

    def _installTorch(self) -> bool:
        try:
            import PyTorchUtils
        except ImportError:
            slicer.util.errorDisplay(f"LiverTumorSeg needs PyTorch {dependencies.torch_requirement()}: install the "
                                     "PyTorch extension from the Extensions Manager, restart Slicer, and try again.")
            return False
        installed = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=True, torchVersionRequirement=dependencies.torch_requirement())
        return installed is not None  # None: declined

    def _installPackages(self, requirements: list[str]) -> bool:
        ensure = _pip_ensure()
        if ensure is not None:
            from packaging.requirements import Requirement

            try:
                ensure([Requirement(r) for r in requirements], requester="LiverTumorSeg",
                       skip_packages=list(dependencies.PROTECTED))
            except RuntimeError:  # the user declined
                return False
            return True
        if not slicer.util.confirmOkCancelDisplay(
                f"LiverTumorSeg needs these Python packages: {', '.join(requirements)}. Install them now?"):
            return False
        folder = Path(tempfile.mkdtemp(prefix="LiverTumorSeg-pip-"))
        try:
            constraints = folder / "constraints.txt"
            constraints.write_text(dependencies.constraints_text(), encoding="utf-8")
            with slicer.util.WaitCursor():
                slicer.util.pip_install(dependencies.pip_arguments(requirements, constraints))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return True

    # ------------------------------------------------------------ live post-processing

    def onPostProcessingChanged(self, *_):
        live = self.logic.live
        if live is None or self._updating:
            return
        ui = self.ui
        params = panel.params_from_controls(
            live.params, dilate_iterations=ui.dilateIterationsSpinBox.value, dilate_max_area_px=ui.dilateMaxAreaSpinBox.value,
            cyst_filter=ui.cystFilterCheckBox.checked, cyst_threshold_hu=ui.cystThresholdSlider.value,
            dilate_mode=panel.dilate_mode_at(ui.dilateModeComboBox.currentIndex), fit_on_core=ui.cystCoreCheckBox.checked,
            refine_outlines=ui.refineCheckBox.checked, refine_max_mm=ui.refineMmSpinBox.value,
            min_peak_probability=ui.minPeakSpinBox.value)
        ui.cystThresholdSlider.enabled = ui.cystCoreCheckBox.enabled = params.cyst_filter
        ui.refineMmSpinBox.enabled = params.refine_outlines
        self._showDilationMode(params.dilate_mode)
        self._guarded(lambda overwrite: live.update(params, overwrite_edited=overwrite))

    def onDecision(self, decision):
        live, region = self.logic.live, self.selectedRegion()
        if live is not None and region is not None:
            self._guarded(lambda overwrite: live.set_decision(region, decision, overwrite_edited=overwrite))

    def showSettings(self, params):
        """Put post-processing settings (e.g. restored from the node) onto the controls, silently."""
        values, ui, self._updating = panel.controls_from_params(params), self.ui, True
        try:
            ui.dilateIterationsSpinBox.value = values["dilate_iterations"]
            ui.dilateMaxAreaSpinBox.value = values["dilate_max_area_px"]
            ui.cystFilterCheckBox.checked = values["cyst_filter"]
            ui.cystThresholdSlider.value = values["cyst_threshold_hu"]
            ui.cystCoreCheckBox.checked = values["fit_on_core"]
            ui.cystThresholdSlider.enabled = ui.cystCoreCheckBox.enabled = values["cyst_filter"]
            ui.refineCheckBox.checked = values["refine_outlines"]
            ui.refineMmSpinBox.value = values["refine_max_mm"]
            ui.refineMmSpinBox.enabled = values["refine_outlines"]
            ui.minPeakSpinBox.value = values["min_peak_probability"]
            ui.dilateModeComboBox.currentIndex = panel.dilate_mode_index(values["dilate_mode"])
            self._showDilationMode(values["dilate_mode"])
        finally:
            self._updating = False

    def _showDilationMode(self, mode):
        """Only the per-slice mode uses the iterations and max-area spin boxes."""
        enabled = panel.slice_dilation_controls_enabled(mode)
        for control in (self.ui.dilateIterationsSpinBox, self.ui.dilateMaxAreaSpinBox,
                        self.ui.dilateIterationsLabel, self.ui.dilateMaxAreaLabel):
            control.enabled = enabled

    def _guarded(self, change):
        """Run a change; if it would overwrite the user's edits, ask first. Refused: nothing changes."""
        try:
            try:
                change(False)
            except mrml.EditedSegmentsError as err:
                if not slicer.util.confirmOkCancelDisplay(f"{err} Replace them?"):
                    self.showSettings(self.logic.live.params)  # the controls go back to what is shown
                    return
                change(True)
        except Exception as err:  # noqa: BLE001 - shown, never a traceback in a slot
            slicer.util.errorDisplay(f"Post-processing failed: {err}")
        self.showRegions()

    def showRegions(self):
        rows = self.logic.live.rows if self.logic.live else []
        table = self.ui.regionTable
        selected = self.selectedRegion()
        self._updating = True  # re-selecting the row must not move the views again
        try:
            table.setRowCount(len(rows))
            for r, cells in enumerate(panel.region_table(rows)):
                for c, text in enumerate(cells):
                    table.setItem(r, c, qt.QTableWidgetItem(text))
                if rows[r]["id"] == selected:
                    table.selectRow(r)
        finally:
            self._updating = False

    def selectedRegion(self):
        items = self.ui.regionTable.selectedItems()
        return int(self.ui.regionTable.item(items[0].row(), 0).text()) if items else None

    def onRegionSelected(self):
        live, region = self.logic.live, self.selectedRegion()
        if live is None or region is None or self._updating:
            return
        x, y, z = live.region_centre_ras(region)
        world = [x, y, z]
        transform = live.volume_node.GetParentTransformNode()
        if transform is not None:
            to_world = vtk.vtkGeneralTransform()
            transform.GetTransformToWorld(to_world)
            world = to_world.TransformPoint(world)
        layout = slicer.app.layoutManager()
        for name in layout.sliceViewNames():  # the slice views this layout shows (none in a 3-D-only one)
            layout.sliceWidget(name).mrmlSliceNode().JumpSliceByCentering(*world)
        chart = live.histogram_chart(region)
        slicer.modules.plots.logic().ShowChartInLayout(chart)


def _pip_ensure():
    """Slicer's ``pip_ensure`` (asks, shows progress and pip's log, offers a restart), where this Slicer
    has it: ``slicer.pydeps`` in recent versions, ``slicer.packaging`` in some before; else None."""
    import importlib

    for name in ("slicer.pydeps", "slicer.packaging"):
        try:
            ensure = getattr(importlib.import_module(name), "pip_ensure", None)
        except ImportError:
            continue
        if ensure is not None:
            try:
                import packaging.requirements  # noqa: F401 - pip_ensure takes its Requirement objects
            except ImportError:
                return None
            return ensure
    return None


def _cuda_devices() -> list[tuple[str, str]]:
    """('CUDA N: <GPU name>', 'cuda:N') per visible GPU (none without torch >= 2.5 or a GPU)."""
    if "torch" in dependencies.missing():  # not imported then: an upgrade must not find the old one loaded
        return []
    try:
        import torch

        return [(f"CUDA {i}: {torch.cuda.get_device_name(i)}", f"cuda:{i}") for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - no torch yet, or no driver
        return []


# ---------------------------------------------------------------- Test


class LiverTumorSegTest(ScriptedLoadableModuleTest):
    """Self-test on a phantom CT (the real child process, the segmentation node, live updates), and the
    Slicer side's checks against MRML (``LiverTumorSegSlicer.mrml_cases``).

    In Slicer: Slicer --no-main-window --testing --python-code "import LiverTumorSeg; LiverTumorSeg.run_self_test()"
    Without Slicer (slicer-core): pytest Testing/Python/test_slicer_module.py
    """

    def setUp(self):
        if getattr(slicer, "mrmlScene", None) is not None:  # Slicer's scene, or the one a slicer-core test made
            slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_segment_phantom_and_tune_live()
        self.setUp()
        self.test_mrml_cases()

    def test_mrml_cases(self):
        """The Slicer side's checks (LiverTumorSegSlicer.mrml_cases, also run by pytest on slicer-core),
        each on an emptied scene and in a fresh folder."""
        self._needsPackages()
        from LiverTumorSegSlicer import mrml_cases

        for case in mrml_cases.CASES:
            with self.subTest(case.__name__), tempfile.TemporaryDirectory(prefix="LiverTumorSeg-test-") as folder:
                self.setUp()
                case(slicer.mrmlScene, Path(folder))

    def _needsPackages(self):
        if missing := dependencies.missing():
            self.skipTest(f"Python packages not installed here: {', '.join(missing)} (open the module once to install them)")

    def test_segment_phantom_and_tune_live(self):
        self._needsPackages()
        from LiverTumorSegLib.phantom import generate_case
        from LiverTumorSegLib.postprocess import PostParams
        from LiverTumorSegLib.terminology import SEGMENTS

        scene = slicer.mrmlScene
        ct, truth = generate_case(7, spacing=(1.5, 1.5, 3.0), matrix=256)
        volume_node = mrml.volume_node_from(scene, ct, "Phantom CT")
        logic = LiverTumorSegLogic()
        self.assertIsNone(logic.input_problem(volume_node))
        nodes_before = scene.GetNumberOfNodes()
        live = logic.segment(volume_node, timeout=600, device="cpu", fast=True, python=os.environ.get("LIVERTUMORSEG_PYTHON"))
        self.assertGreater(scene.GetNumberOfNodes(), nodes_before)
        segmentation = live.seg_node.GetSegmentation()
        self.assertEqual([segmentation.GetNthSegment(i).GetName() for i in range(3)], [s["name"] for s in SEGMENTS])
        liver = mrml.segment_mask(live.seg_node, "liver", live.labels.shape)
        self.assertTrue((liver == (live.labels == 1)).all())
        dice = 2 * (liver & (truth.array >= 1)).sum() / (liver.sum() + (truth.array >= 1).sum())
        self.assertGreater(dice, 0.8)
        live.update(PostParams(cyst_filter=False))
        self.assertFalse(mrml.segment_mask(live.seg_node, "liver_cyst", live.labels.shape).any())
        live.update(PostParams(min_peak_probability=0.95))  # the confidence gate: each row says what it did
        self.assertTrue(any(r["decision"] == "low confidence" for r in live.rows))  # this phantom has a faint region
        for row in live.rows:
            self.assertEqual(row["decision"] == "low confidence", row["peak_probability"] < 0.95)
        tumor = mrml.segment_mask(live.seg_node, "liver_tumor", live.labels.shape)
        self.assertTrue((tumor == (live.labels == 2)).all())
        self.assertIsNone(logic.work_dir)  # temporary files removed


def run_self_test() -> None:
    """Entry point for ``Slicer --testing``: runs the test class and exits with its result."""
    result = unittest.TextTestRunner(verbosity=2).run(unittest.defaultTestLoader.loadTestsFromTestCase(LiverTumorSegTest))
    slicer.util.exit(0 if result.wasSuccessful() else 1)
